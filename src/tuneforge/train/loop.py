"""The training loop: one recipe from config to a run directory, read top to bottom.

:func:`train` is set-up → loop → finish. :func:`setup` builds everything a run needs (tokenizer, data, the
model with its method, the loss wrapper, optimizer, schedule, a resumed state); :func:`fit` runs the steps
(the step itself is :func:`tuneforge.train.step.train_step`), evaluates, checkpoints and writes metrics;
:func:`finish` saves the adapter or model, plots the loss and prints the summary. One process or many under
torchrun reads the same: the differences live in :class:`tuneforge.train.runtime.Runtime`.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from tuneforge.config import RunConfig, save_config
from tuneforge.data.dataset import AUTO_VAL_MIN_EXAMPLES, TrainData, build_preference_data, build_training_data
from tuneforge.data.preference import PreferenceData, collate_pairs
from tuneforge.errors import ConfigError, StopTraining, TuneforgeError
from tuneforge.files import replaced_atomically
from tuneforge.log import get_logger
from tuneforge.methods.lora import count_parameters, format_trainable
from tuneforge.methods.peft_format import load_adapter, save_adapter
from tuneforge.methods.setup import load_model_for, lora_speedups, prepare_model
from tuneforge.models.load import load_tokenizer, pad_token_id
from tuneforge.models.threads import apply_threads
from tuneforge.plotting import plot_loss
from tuneforge.train import recompute as recomputation
from tuneforge.train.attention import packing_refusal, use_document_attention
from tuneforge.train.callbacks import TrainCallback
from tuneforge.train.distributed import world_size
from tuneforge.train.kernels import apply_kernels, compile_layers
from tuneforge.train.optimizer import build_optimizer, to_bf16_weights
from tuneforge.train.plan import GIB, check_memory, choose_recompute, cpu_need, cpu_plan_inputs, cpu_rows_per_forward
from tuneforge.train.preference import frozen_reference, precompute_reference_logps, settings_for
from tuneforge.train.rundir import RunStatus, check_run, run_inputs
from tuneforge.train.runtime import Runtime
from tuneforge.train.schedule import make_scheduler
from tuneforge.train.step import Batch, CausalLMLoss, PreferenceLoss, StepResult, train_step, validate
from tuneforge.train.tracking import trackers_for

logger = get_logger(__name__)
BAR_METRICS = ("rewards/margins", "rewards/accuracies")  # a preference run's progress bar shows these too


@dataclass
class TrainResult:
    """What a finished run produced and measured."""

    run_dir: Path
    steps: int
    final_loss: float
    val_loss: float | None
    trained_tokens: int
    seconds: float
    trainable: int
    total: int
    output: Path
    loss_png: Path | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    peak_gpu_gib: float | None = None
    peak_ram_gib: float | None = None
    base_weights: str = "as loaded"  # qlora: "4-bit nf4 (double quant)"
    processes: int = 1  # under torchrun: the world size


@dataclass
class TrainerState:
    """Where the loop is; what a checkpoint's ``trainer.json`` records beside the step."""

    step: int = 0
    loss: float = float("nan")
    val_loss: float | None = None
    trained_tokens: int = 0
    stopped: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss}


@dataclass
class Run:
    """Everything :func:`setup` builds and the loop uses."""

    config: RunConfig
    runtime: Runtime
    run_dir: Path
    tokenizer: Any
    data: TrainData | PreferenceData  # rows (SFT) or pairs (a preference objective)
    model: torch.nn.Module  # the HF model (what is saved)
    loss_model: CausalLMLoss  # the model with the loss in its forward (what trains; the FSDP root)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: int
    state: TrainerState
    quiet: bool
    attention_before: str
    started: float = field(default_factory=time.perf_counter)
    forward_rows: int | None = None  # on the CPU: rows per forward when a micro-batch is split to save RAM

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def pairs(self) -> bool:
        return isinstance(self.data, PreferenceData)


def train(config: RunConfig, resume: bool = False, overwrite: bool = False,
          callbacks: Sequence[TrainCallback] = (), model: torch.nn.Module | None = None,
          tokenizer: Any = None, data: TrainData | None = None, quiet: bool = False,
          resume_with_changes: bool = False) -> TrainResult:
    """Run one fine-tuning job as configured and write its run directory.

    ``callbacks`` see the run start, each evaluation point and record, and its end
    (:class:`tuneforge.train.callbacks.TrainCallback`); the config's experiment trackers are added to them.
    ``model``/``tokenizer``/``data`` replace what the config would load. ``train.objective`` other than sft trains on
    preference pairs (:class:`tuneforge.data.preference.PreferenceData`) with the same step.

    The run directory is made only once the config, the data and the model are good, and is marked
    (``tuneforge-run.json``) finished, stopped or failed at the end; ``--overwrite`` replaces only a run, and a
    resumed run may change only its length and what it measures, those with ``resume_with_changes``
    (:mod:`tuneforge.train.rundir`).
    """
    status = RunStatus(Path(config.output_dir))
    try:
        run = setup(config, resume, overwrite, model, tokenizer, data, quiet, status, resume_with_changes)
        callbacks = [*callbacks, *trackers_for(config)]
        for cb in callbacks:
            cb.on_start(run.model, run.run_dir, config)
        fit(run, callbacks)
        result = finish(run, callbacks)
    except BaseException as e:  # the marker says the run failed, and why; the error goes on to the caller
        status.fail(e)
        raise
    status.end(stopped=run.state.stopped is not None)
    return result


# --- set-up ----------------------------------------------------------------------------------------

def setup(config: RunConfig, resume: bool, overwrite: bool, model: torch.nn.Module | None, tokenizer: Any,
          data: TrainData | PreferenceData | None, quiet: bool, status: RunStatus | None = None,
          resume_with_changes: bool = False) -> Run:
    """Devices, data, model + method, the run directory, optimizer and schedule; the resumed state if asked.

    Nothing is written before the run directory's checks, the data and the model have passed.
    """
    t = config.train
    apply_threads(t.threads)  # the one rule: train.threads, else what does not oversubscribe the machine
    torch.manual_seed(t.seed)
    runtime = Runtime(t.batch_size, resolve_device(t.device))
    recompute = choose_recompute(config, runtime.device)
    if model is None and runtime.device.type == "cuda":  # refuse early, with the predicted split and advice
        check_memory(config, runtime.device, recompute=recompute)
    run_dir, inputs = Path(config.output_dir), run_inputs(config)
    checkpoint = runtime.on_main(check_run, run_dir, inputs, config, resume, overwrite, resume_with_changes)
    tokenizer = tokenizer or load_tokenizer(config.model, config.trust_remote_code)
    build = build_training_data if t.objective == "sft" else build_preference_data
    data = data or build(config.data, tokenizer, seed=t.seed)
    if not quiet:
        report_data(data)
    rows = forward_rows(config, runtime.device, model, recompute, quiet)
    model, loss_model, attention_before, residuals = setup_model(config, runtime, model, data, recompute, quiet)
    status = status or RunStatus(run_dir)
    runtime.on_main(status.create, inputs, resume, overwrite)  # rank 0 writes files, all wait
    runtime.on_main(save_config, config, run_dir / "config.yaml")
    params = [p for p in loss_model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.lr, t.weight_decay, t.weights, t.optimizer_state, runtime.device,
                                residuals)
    del residuals
    steps = total_steps(config, len(train_units(data)))
    if not quiet and t.max_steps is None and t.epochs is None:
        logger.info(f"train.epochs unset: {epochs_for(config, len(train_units(data))):g} pass(es) over the data, "
                    f"{steps} optimizer steps (set train.epochs or train.max_steps to choose)")
    if not quiet:
        for warning in small_data_warnings(config, data, steps):
            logger.warning(warning)
    warmup = t.warmup_steps if t.warmup_steps is not None else max(1, round(0.05 * steps))
    scheduler = make_scheduler(optimizer, steps, warmup, t.schedule, t.min_lr_ratio)
    run = Run(config=config, runtime=runtime, run_dir=run_dir, tokenizer=tokenizer, data=data, model=model,
              loss_model=loss_model, optimizer=optimizer, scheduler=scheduler, steps=steps, state=TrainerState(),
              quiet=quiet, attention_before=attention_before, forward_rows=rows)
    if run.pairs and loss_model.settings.reference == "precomputed":
        run.data = reference_pass(run, resume)
    restore(run, checkpoint)
    return run


def setup_model(config: RunConfig, runtime: Runtime, model: torch.nn.Module | None,
                data: TrainData | PreferenceData, recompute: str,
                quiet: bool) -> tuple[torch.nn.Module, CausalLMLoss, str, dict[torch.nn.Parameter, torch.Tensor]]:
    """Load (unless given) and prepare the model for the method; wrap it with its loss; shard under torchrun.

    Returns the HF model, its loss wrapper, the attention implementation to restore at the end and, with
    ``train.weights=bf16_kahan``, what the cast to bf16 dropped from each weight (the starting compensation).
    """
    t, device = config.train, runtime.device
    placement = runtime.load_placement(config, model is not None)
    if model is None:
        model = load_model_for(config, device, placement)
    if placement == "device":
        model.to(device)
    residuals = {}
    if t.weights != "fp32_master":  # bf16 weights with no fp32 master copy (tuneforge.train.optimizer)
        # under torchrun FSDP2 replaces the parameters by their shards, which these residuals would not reach
        residuals = to_bf16_weights(model, keep_residuals=t.weights == "bf16_kahan" and world_size() == 1)
    if config.method.lora.base_precision == "fp8" and world_size() > 1:
        why = ("QLoRA's FP8 compute has not been run under FSDP2" if config.method.name == "qlora"
               else "FSDP2 does not shard its FP8 weights")
        raise ConfigError(f"method.lora.base_precision=fp8 runs on one GPU ({why}); "
                          "set method.lora.base_precision=bf16 under torchrun, or run one process")
    trainable_summary = prepare_method(model, config, device)
    recomputation.enable(model, recompute)
    # compiled layers fuse what Liger's kernels would (measured faster on an H200), so auto leaves Liger out then
    kernels = apply_kernels(model, "torch" if t.compile and t.kernels == "auto" else t.kernels, device)
    if t.compile:
        kernels += f", {compile_layers(model, device)} compiled layers"
    attention_before = model.config._attn_implementation  # transformers has no public getter
    packed = (config.data.packing if isinstance(data, PreferenceData)  # packed pairs: 2+ documents per row
              else any(max(row.seq_ids) > 0 for row in data.train_rows))
    if packed and isinstance(data, PreferenceData) and (reason := packing_refusal(model)) is not None:
        raise ConfigError(f"data.packing: {model.config.model_type} cannot keep packed pairs apart exactly "
                          f"({reason}); set data.packing: false")
    if packed:  # attention stays inside examples
        use_document_attention(model, device)
    if not quiet:
        logger.info(f"{trainable_summary}; recomputation {recompute}; kernels {kernels}; "
                    f"attention {model.config._attn_implementation}")
    offload = recomputation.OffloadedActivations() if recompute == "offload" else None
    amp = autocast_dtype(config, device)
    if t.objective == "sft":
        loss_model = CausalLMLoss(model, t.loss_chunk_tokens, amp, offload)
    else:
        settings = settings_for(config)
        reference = frozen_reference(model) if settings.needs_reference and settings.reference == "model" else None
        loss_model = PreferenceLoss(model, settings, amp, offload, reference)
    loss_model.train()
    return model, runtime.setup(loss_model, placement), attention_before, residuals


def prepare_method(model: torch.nn.Module, config: RunConfig, device: torch.device) -> str:
    """What trains, per the method; ``method.lora.init_adapter`` continues a saved adapter instead of a fresh one."""
    init = config.method.lora.init_adapter
    if init is None or config.method.name not in ("lora", "qlora"):
        return prepare_model(model, config.method, device)
    model.requires_grad_(False)
    load_adapter(model, init, "default", trainable=True)
    logger.info(f"method.lora.init_adapter: the adapter's own settings replace method.lora's r, alpha, targets, "
                f"target_parameters, dropout, use_rslora and use_dora ({Path(init) / 'adapter_config.json'})")
    lora_speedups(model, config.method.lora, device)
    return f"{format_trainable(model)} (adapter from {init})"


def reference_pass(run: Run, resume: bool) -> PreferenceData:
    """The pairs with the reference's log-probs: computed by the model before step 1 and kept in the run directory
    (``reference_logps.json``), from where a resumed run reads them, its model being no longer the reference."""
    data, path = run.data, run.run_dir / "reference_logps.json"
    if resume and path.exists():
        saved = json.loads(path.read_text())
        train, val = ([replace(p, ref_logps=tuple(x)) for p, x in zip(pairs, saved[k], strict=True)]
                      for pairs, k in ((data.train_pairs, "train"), (data.val_pairs, "val")))
        return replace(data, train_pairs=train, val_pairs=val)
    if not run.quiet:
        logger.info(f"reference log-probs: one pass over {len(data.train_pairs) + len(data.val_pairs)} pairs")
    t, pad = run.config.train, pad_token_id(run.tokenizer)
    amp = autocast_dtype(run.config, run.runtime.device)
    train, val = (precompute_reference_logps(run.model, pairs, pad, t.batch_size, t.loss_chunk_tokens, amp)
                  for pairs in (data.train_pairs, data.val_pairs))
    run.runtime.on_main(path.write_text, json.dumps({"train": [p.ref_logps for p in train],
                                                     "val": [p.ref_logps for p in val]}))
    return replace(data, train_pairs=train, val_pairs=val)


def forward_rows(config: RunConfig, device: torch.device, model: torch.nn.Module | None, recompute: str,
                 quiet: bool) -> int | None:
    """On the CPU (one process): the rows one forward takes, fewer than ``train.batch_size`` when the whole
    micro-batch would take too much RAM (refused, with advice, when one row cannot fit). None elsewhere."""
    if device.type != "cpu" or world_size() > 1:
        return None
    shape = model.config if model is not None else config.model
    rows = cpu_rows_per_forward(config, shape, recompute)
    batch = config.train.batch_size
    if rows < batch and not quiet:
        need = [cpu_need(cpu_plan_inputs(config, shape, recompute, n)) / GIB for n in (batch, rows)]
        logger.info(f"CPU memory: a micro-batch of {batch} rows × {config.data.max_seq_len} tokens would need "
                    f"~{need[0]:.1f} GiB of RAM in one forward; it runs as forwards of {rows} rows (~{need[1]:.1f} "
                    "GiB), the same rows per optimizer step and the same loss")
    return rows


def restore(run: Run, ckpt: Path | None) -> None:
    """Resume from checkpoint ``ckpt`` (state, data position, metrics), or start a fresh metrics log."""
    if ckpt is not None:
        trainer = run.runtime.load_checkpoint(ckpt, run.loss_model, run.optimizer, run.scheduler)
        run.state.step = trainer["step"]
        run.runtime.on_main(keep_metrics_until, run.metrics_path, run.state.step)
        if not run.quiet:
            logger.info(f"resumed from {ckpt} (step {run.state.step})")
    elif run.runtime.is_main:
        run.metrics_path.unlink(missing_ok=True)


# --- the loop ----------------------------------------------------------------------------------------

def fit(run: Run, callbacks: Sequence[TrainCallback]) -> None:
    """Train from ``run.state.step`` to the last step (or until a callback stops the run)."""
    t, state = run.config.train, run.state
    batches = micro_batches(len(train_units(run.data)), t.batch_size, t.seed)
    for _ in range(state.step * t.grad_accum):
        next(batches)  # data position: the resumed run sees the batches an uninterrupted one would
    bar = tqdm(total=run.steps, initial=state.step, desc="train", disable=run.quiet or not run.runtime.is_main,
               dynamic_ncols=True)
    with run.runtime.main_file(run.metrics_path).open("a") as log:
        while state.step < run.steps and not state.stopped:
            step_start = time.perf_counter()
            result = one_step(run, [next(batches) for _ in range(t.grad_accum)])
            record = step_record(state, result, time.perf_counter() - step_start)
            if t.eval_every and state.step % t.eval_every == 0 and state.step < run.steps:
                evaluate(run, callbacks, record)
            if state.step % t.log_every == 0 or "val_loss" in record:
                write_record(log, record, callbacks)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                            **{k.split("/")[-1]: f"{result.metrics[k]:.3f}" for k in BAR_METRICS
                               if k in result.metrics})
            bar.update(1)
            if t.save_every and state.step % t.save_every == 0 and state.step < run.steps:
                run.runtime.save_checkpoint(run.run_dir, state.step, run.loss_model, run.optimizer, run.scheduler,
                                            state.state_dict())
        bar.close()
        if state.stopped:
            if not run.quiet:
                logger.info(f"stopping early at step {state.step}: {state.stopped}")
            run.steps = state.step
        write_record(log, final_record(run, callbacks), callbacks)


def one_step(run: Run, index_batches: list[list[int]]) -> StepResult:
    """One optimizer step on this process's share of ``grad_accum`` global micro-batches."""
    units, size = train_units(run.data), run.forward_rows or run.config.train.batch_size
    batches = [micro_batch(run, [units[i] for i in indices[j:j + size]])  # a CPU split keeps the loss the same
               for indices in index_batches for j in range(0, len(indices), size)]
    try:
        return train_step(run.loss_model, batches, run.optimizer, run.scheduler, run.config.train.max_grad_norm,
                          run.runtime.all_sum)
    except TuneforgeError as e:
        raise TuneforgeError(f"at step {run.state.step + 1} (train.lr is {run.config.lr:g}): {e}") from e


def micro_batch(run: Run, units: list[Any]) -> Batch:
    """This process's share of one global micro-batch, collated: rows (SFT), or pairs with both answers of each
    pair in one forward (packed into rows of up to two ``max_seq_len`` with ``data.packing``)."""
    pad_id = pad_token_id(run.tokenizer)
    if not run.pairs:
        return run.runtime.batch(units, pad_id)
    pack_len = 2 * run.config.data.max_seq_len if run.config.data.packing else None
    return collate_pairs(run.runtime.local_rows(units), pad_id, pack_len,
                         share_prompt=pack_len is not None and run.loss_model.share_prompt)


def train_units(data: TrainData | PreferenceData) -> list[Any]:
    """What a micro-batch draws from: packed rows (SFT) or pairs."""
    return data.train_pairs if isinstance(data, PreferenceData) else data.train_rows


def step_record(state: TrainerState, result: StepResult, seconds: float) -> dict[str, Any]:
    """Advance ``state`` by one step's result; the step's metrics record."""
    state.step += 1
    state.loss = result.loss
    state.trained_tokens += result.trained
    record = {"step": state.step, "loss": round(result.loss, 5), "lr": result.lr,
              "grad_norm": round(result.grad_norm, 4), "tokens_per_s": round(result.tokens / seconds, 1),
              "trained_tokens": result.trained, **{k: round(v, 5) for k, v in result.metrics.items()}}
    state.records.append(record)
    return record


def evaluate(run: Run, callbacks: Sequence[TrainCallback], record: dict[str, Any]) -> None:
    """Validation loss and the callbacks' metrics into ``record``; a callback's StopTraining ends the run."""
    state, size = run.state, run.config.train.batch_size
    units = run.data.val_pairs if run.pairs else run.data.val_rows
    state.val_loss = None
    if units:
        batches = (micro_batch(run, units[i:i + size]) for i in range(0, len(units), size))
        state.val_loss, metrics = validate(run.loss_model, batches, run.runtime.all_sum)
        record["val_loss"] = round(state.val_loss, 5)
        record.update({f"val_{k}": round(v, 5) for k, v in metrics.items()})
    for cb in callbacks:
        try:
            record.update(cb.on_eval(state.step, run.model))
        except StopTraining as e:
            state.stopped = str(e)
            return


def final_record(run: Run, callbacks: Sequence[TrainCallback]) -> dict[str, Any]:
    """The closing record: final validation loss, and the callbacks' last measurement (unless they stopped)."""
    state = run.state
    record: dict[str, Any] = {"step": run.steps, "final": True}
    stopped = state.stopped
    evaluate(run, () if stopped else callbacks, record)
    if stopped:
        record["stopped_early"] = state.stopped = stopped
    return record


def write_record(log: TextIO, record: dict[str, Any], callbacks: Sequence[TrainCallback]) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()
    for cb in callbacks:
        cb.on_record(record)


# --- finish --------------------------------------------------------------------------------------

def finish(run: Run, callbacks: Sequence[TrainCallback]) -> TrainResult:
    """Save the adapter or model, plot the loss, print the summary; every process returns the result."""
    model, config = run.model, run.config
    if model.config._attn_implementation != run.attention_before:  # generation after training is faster on SDPA
        model.set_attn_implementation(run.attention_before)

    def save() -> tuple[Path, int, int]:
        ensure_finite(model)
        return (save_output(model, run.tokenizer, config, run.run_dir), *count_parameters(model))

    # under torchrun rank 0 saves with the gathered full weights; every rank gets its result
    output, trainable, total = run.runtime.with_full_weights(run.loss_model, save,
                                                             config.method.name in ("full", "freeze"))
    state = run.state
    result = TrainResult(run_dir=run.run_dir, steps=run.steps, final_loss=state.loss, val_loss=state.val_loss,
                         trained_tokens=state.trained_tokens, seconds=time.perf_counter() - run.started,
                         trainable=trainable, total=total, output=output,
                         loss_png=run.runtime.on_main(plot_loss, run.metrics_path, run.run_dir / "plots" / "loss.png"),
                         metrics=state.records, peak_gpu_gib=peak_gpu_gib(run.runtime.device),
                         peak_ram_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20),
                         base_weights=base_weights_text(config), processes=world_size())
    if not run.quiet:
        logger.info(summary_table(result))
    if run.runtime.is_main:
        for cb in callbacks:
            cb.on_end(run.run_dir)
    run.runtime.barrier()  # every process leaves together
    return result


# --- helpers ---------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU by default, fp32 on CPU (unless the config says otherwise)."""
    want = config.train.dtype
    if want == "bf16" or (want == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def micro_batches(n_rows: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """An endless, deterministic stream of row-index batches: a new seeded shuffle per epoch."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n_rows, generator=g).tolist()
        for i in range(0, n_rows, batch_size):
            yield perm[i:i + batch_size]
        epoch += 1


# With train.epochs unset: one pass over data big enough for AUTO_STEPS steps, else more passes, up to
# AUTO_MAX_EPOCHS (beyond that a small set is memorized rather than learned).
AUTO_STEPS = 100
AUTO_MAX_EPOCHS = 10


def steps_per_epoch(config: RunConfig, n_rows: int) -> int:
    """Optimizer steps in one pass over ``n_rows`` rows (or pairs)."""
    return max(1, math.ceil(n_rows / config.train.batch_size / config.train.grad_accum))


def epochs_for(config: RunConfig, n_rows: int) -> float:
    """``train.epochs``, or when it is unset the passes the data's size calls for."""
    if config.train.epochs is not None:
        return config.train.epochs
    return float(min(AUTO_MAX_EPOCHS, max(1, math.ceil(AUTO_STEPS / steps_per_epoch(config, n_rows)))))


def total_steps(config: RunConfig, n_rows: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    return max(1, math.ceil(steps_per_epoch(config, n_rows) * epochs_for(config, n_rows)))


def keep_metrics_until(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log has no duplicated steps."""
    if not path.exists():
        return
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    kept = [r for r in records if r.get("step", 0) <= step and not r.get("final")]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def ensure_finite(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p).all():
            raise TuneforgeError(f"parameter {name} is not finite; nothing was saved. Lower train.lr.")


def save_output(model: torch.nn.Module, tokenizer: Any, config: RunConfig, run_dir: Path) -> Path:
    """LoRA/QLoRA → ``adapter/`` in the PEFT format; full/freeze → ``model/`` in the HF format."""
    if config.method.name in ("lora", "qlora"):
        return save_adapter(model, run_dir / "adapter", base_model_name_or_path=config.model)
    out = run_dir / "model"
    with replaced_atomically(out) as tmp:  # a kill never leaves half a model; its temp folder is cleaned on resume
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def peak_gpu_gib(device: torch.device) -> float | None:
    """This process's peak of allocated GPU memory (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / (1 << 30)


# Below these a run is mostly warm-up and its validation loss is noise (docs/training.md, "Small data").
FEW_STEPS = 20
FEW_VALIDATION = 10


def small_data_warnings(config: RunConfig, data: TrainData | PreferenceData, steps: int) -> list[str]:
    """What a user should know before a run on little data: few optimizer steps, a tiny validation set."""
    t, out = config.train, []
    per_epoch = steps_per_epoch(config, len(train_units(data)))
    if steps < FEW_STEPS:
        epochs = math.ceil(FEW_STEPS / per_epoch)
        out.append(f"this run takes only {steps} optimizer step(s) ({per_epoch} per epoch at train.batch_size "
                   f"{t.batch_size} × train.grad_accum {t.grad_accum}); little will change. Set "
                   f"train.epochs={epochs} or train.max_steps={FEW_STEPS} (or a smaller train.batch_size)")
    n_val = len(data.val_pairs) if isinstance(data, PreferenceData) else data.n_val_examples
    if 0 < n_val < FEW_VALIDATION:
        out.append(f"the validation set has {n_val} example(s): its loss is noise. Give data.eval a file, or "
                   "raise data.val_fraction")
    elif n_val == 0 and config.data.val_fraction is None and not config.data.eval:
        out.append(f"no validation set: with data.val_fraction unset, fewer than {AUTO_VAL_MIN_EXAMPLES} "
                   "examples all train; give data.eval a file, or set data.val_fraction")
    elif n_val == 0 and t.eval_every is not None:
        out.append("train.eval_every is set but there is no validation set (fewer than 20 examples, or "
                   "data.val_fraction 0); give data.eval a file")
    return out


def report_data(data: TrainData | PreferenceData) -> None:
    held = f", {len(data.held_out)} held out" if data.held_out else ""
    if isinstance(data, PreferenceData):
        logger.info(f"data: {len(data.train_pairs)} train pairs ({data.n_train_tokens} tokens, both answers), "
                    f"{len(data.val_pairs)} validation pairs{held}")
    else:
        logger.info(f"data: {data.n_train_examples} train examples in {len(data.train_rows)} rows "
                    f"({data.n_train_tokens} tokens), {data.n_val_examples} validation examples{held}")
    if data.skipped:
        logger.info(f"skipped {len(data.skipped)} bad records, e.g.:")
        for loc, why in data.skipped[:5]:
            logger.info(f"    {loc}: {why.splitlines()[0]}")


def base_weights_text(config: RunConfig) -> str:
    """How the frozen base was held: the summary says so, since QLoRA's quality cost comes from it (and for bf16
    weights, how their updates were kept)."""
    weights = config.train.weights
    if weights != "fp32_master":
        kept = "Kahan-compensated" if weights == "bf16_kahan" else "stochastically rounded"
        return f"bf16, no fp32 master copy ({kept} AdamW updates)"
    if config.method.name == "lora" and config.method.lora.base_precision == "fp8":
        return "fp8 e4m3 with per-output-channel scales, quantized after loading"
    if config.method.name != "qlora":
        return "as loaded"
    q = config.method.quant
    fp8 = ", FP8 compute (e4m3 codes made per GEMM)" if config.method.lora.base_precision == "fp8" else ""
    return f"4-bit {q.quant_type}" + (" (double quant)" if q.double_quant else "") + f", quantized on load{fp8}"


def summary_table(r: TrainResult) -> str:
    rows = [
        ("run directory", str(r.run_dir)),
        ("base weights", r.base_weights),
        ("processes", f"{r.processes} (torchrun)" if r.processes > 1 else "1"),
        ("steps", str(r.steps)),
        ("final train loss", f"{r.final_loss:.4f}"),
        ("validation loss", f"{r.val_loss:.4f}" if r.val_loss is not None else "-"),
        ("trained tokens", f"{r.trained_tokens:,}"),
        ("time", f"{r.seconds:.1f} s"),
        ("trainable params", f"{r.trainable:,} of {r.total:,} ({100 * r.trainable / max(r.total, 1):.3f}%)"),
        ("peak GPU memory", f"{r.peak_gpu_gib:.2f} GiB (allocated)" if r.peak_gpu_gib is not None else "-"),
        ("peak RAM", f"{r.peak_ram_gib:.2f} GiB" if r.peak_ram_gib is not None else "-"),
        ("output", str(r.output)),
        ("loss curve", str(r.loss_png) if r.loss_png else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "summary", "-" * (width + 40)] + [f"{k:<{width}}  {v}" for k, v in rows])
