"""The training loop: one recipe from config to a run directory.

setup (tokenizer, data, model, method, optimizer) → steps (accumulated, token-normalized loss)
→ periodic validation and checkpoints → final adapter/model, metrics, loss curve, summary.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneforge.config import RunConfig, save_config
from tuneforge.data.dataset import TrainData, build_training_data
from tuneforge.data.packing import IGNORE, PackedRow, collate
from tuneforge.errors import StopTraining, TuneforgeError
from tuneforge.methods.lora import count_parameters
from tuneforge.methods.setup import load_model_for, prepare_model
from tuneforge.models.load import load_tokenizer
from tuneforge.train import distributed, sharding
from tuneforge.train import recompute as recomputation
from tuneforge.train.attention import attention_mask, use_document_attention
from tuneforge.train.checkpoint import latest_checkpoint
from tuneforge.train.kernels import apply_kernels
from tuneforge.train.loss import chunked_lm_loss
from tuneforge.train.schedule import make_scheduler
from tuneforge.train.sharding import load_checkpoint, save_checkpoint  # the one-process ones, or gathered

EvalCallback = Callable[[int, torch.nn.Module], dict[str, float]]


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


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int,
            amp: torch.dtype | None) -> tuple[torch.Tensor, int]:
    """Summed loss and trained-token count of one batch of packed rows."""
    device = next(model.parameters()).device
    mask = attention_mask(model, batch["seq_ids"], device)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        hidden = model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                                  position_ids=batch["position_ids"].to(device),
                                  use_cache=False).last_hidden_state
        return chunked_lm_loss(hidden, model.get_output_embeddings(), batch["labels"].to(device),
                               chunk_tokens)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, rows: list[PackedRow], pad_id: int, batch_size: int,
                    chunk_tokens: int, amp: torch.dtype | None) -> float | None:
    """Mean per-token loss over validation rows (None when there are none)."""
    if not rows:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):  # under torchrun each process takes its share of each batch
        loss, n = lm_loss(model, collate(distributed.local_rows(rows[i:i + batch_size]), pad_id), chunk_tokens, amp)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return distributed.all_sum(total) / max(distributed.all_sum(count), 1)


def total_steps(config: RunConfig, n_rows: int) -> int:
    t = config.train
    if t.max_steps is not None:
        return t.max_steps
    per_epoch = math.ceil(n_rows / t.batch_size / t.grad_accum)
    return max(1, math.ceil(per_epoch * t.epochs))


def prepare_run_dir(config: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(config.output_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise TuneforgeError(f"run directory '{run_dir}' already exists; pass --resume to continue "
                                 "it, --overwrite to replace it, or set output_dir to a new path")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(config: RunConfig, resume: bool = False, overwrite: bool = False,
          callbacks: tuple[EvalCallback, ...] = (), model: torch.nn.Module | None = None,
          tokenizer: Any = None, data: TrainData | None = None, quiet: bool = False) -> TrainResult:
    """Run one fine-tuning job as configured and write its run directory."""
    t = config.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    device = distributed.init(t.batch_size, resolve_device(t.device))  # cuda:LOCAL_RANK under torchrun
    recompute = recomputation.choose_mode(config, device)
    if model is None and device.type == "cuda":  # refuse early, with the predicted split and advice
        from tuneforge.train.plan import check_memory

        check_memory(config, device, recompute=recompute)
    amp = autocast_dtype(config, device)
    run_dir = distributed.on_main(prepare_run_dir, config, resume, overwrite)  # rank 0 writes files, all wait
    distributed.on_main(save_config, config, run_dir / "config.yaml")
    say = (lambda *a: None) if quiet or not distributed.is_main() else print

    tokenizer = tokenizer or load_tokenizer(config.model, config.trust_remote_code)
    data = data or build_training_data(config.data, tokenizer, seed=t.seed)
    report_data(data, say)
    placement = sharding.load_placement(config, model is not None)
    if model is None:
        model = load_model_for(config, device, placement)
    if placement == "device":
        model.to(device)
    trainable_summary = prepare_model(model, config.method)
    loaded = sharding.host_weights(model, placement)
    recomputation.enable(model, recompute)
    kernels = apply_kernels(model, t.kernels, device)
    packed = any(max(row.seq_ids) > 0 for row in data.train_rows)
    attention_before = model.config._attn_implementation
    if packed:
        use_document_attention(model, device)
    attention = model.config._attn_implementation
    say(f"[tuneforge] {trainable_summary}; recomputation {recompute}; kernels {kernels}; attention {attention}")
    model.train()
    model = sharding.shard_model(model, device)  # FSDP2 under torchrun, before the optimizer sees the parameters
    if placement != "device":
        sharding.fill_from_rank0(model, loaded, device)
        del loaded
    callbacks = tuple(callbacks) + forgetting_callbacks(config, model, tokenizer, say)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=t.weight_decay,
                                  fused=device.type == "cuda")
    steps = total_steps(config, len(data.train_rows))
    warmup = t.warmup_steps if t.warmup_steps is not None else max(1, round(0.05 * steps))
    scheduler = make_scheduler(optimizer, steps, warmup, t.schedule, t.min_lr_ratio)

    start = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        start = load_checkpoint(ckpt, model, optimizer, scheduler)["step"]
        distributed.on_main(keep_metrics_until, metrics_path, start)
        say(f"[tuneforge] resumed from {ckpt} (step {start})")
    elif not resume and distributed.is_main():
        metrics_path.unlink(missing_ok=True)

    pad_id = tokenizer.pad_token_id
    stream = micro_batches(len(data.train_rows), t.batch_size, t.seed)
    for _ in range(start * t.grad_accum):
        next(stream)  # data position: the resumed run sees the batches an uninterrupted one would

    records: list[dict[str, Any]] = []
    stopped: str | None = None
    trained_tokens, t0, loss_value, val = 0, time.perf_counter(), float("nan"), None
    bar = tqdm(total=steps, initial=start, desc="train", disable=quiet or not distributed.is_main(),
               dynamic_ncols=True)
    with distributed.main_file(metrics_path).open("a") as log:
        for step in range(start, steps):
            step_t0 = time.perf_counter()
            # this rank's share of each global micro-batch (all of it on one process)
            batches = [collate(distributed.local_rows([data.train_rows[i] for i in next(stream)]), pad_id)
                       for _ in range(t.grad_accum)]
            # normalize by the trained tokens of the whole accumulated batch, not per micro-batch
            n_total = distributed.all_sum(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches))
            step_loss = 0.0
            for b in batches:
                loss, _ = lm_loss(model, b, t.loss_chunk_tokens, amp)
                (loss / max(n_total, 1)).backward()
                step_loss += float(loss.detach())
            loss_value = distributed.all_sum(step_loss) / max(n_total, 1)
            if not math.isfinite(loss_value):
                raise TuneforgeError(
                    f"loss became {loss_value} at step {step + 1}; stopping without saving these "
                    f"weights. Lower train.lr (now {config.lr:g}), keep train.max_grad_norm set, or "
                    "use fp32 (train.dtype=fp32).")
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
                         if t.max_grad_norm else grad_norm_of(params))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            tokens = distributed.all_sum(sum(int((b["seq_ids"] >= 0).sum()) for b in batches))
            trained_tokens += n_total
            rec = {"step": step + 1, "loss": round(loss_value, 5), "lr": lr,
                   "grad_norm": round(distributed.scalar(grad_norm), 4),
                   "tokens_per_s": round(tokens / (time.perf_counter() - step_t0), 1),
                   "trained_tokens": n_total}
            if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < steps:
                val = validation_loss(model, data.val_rows, pad_id, t.batch_size, t.loss_chunk_tokens, amp)
                if val is not None:
                    rec["val_loss"] = round(val, 5)
                stopped = run_callbacks(callbacks, step + 1, model, rec)
            records.append(rec)
            if (step + 1) % t.log_every == 0 or "val_loss" in rec:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            bar.update(1)
            if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < steps:
                save_checkpoint(run_dir, step + 1, model, optimizer, scheduler, {"loss": loss_value})
            if stopped:
                say(f"\n[tuneforge] stopping early at step {step + 1}: {stopped}")
                steps = step + 1
                break
        bar.close()
        val = validation_loss(model, data.val_rows, pad_id, t.batch_size, t.loss_chunk_tokens, amp)
        final: dict[str, Any] = {"step": steps, "final": True}
        if val is not None:
            final["val_loss"] = round(val, 5)
        if stopped:
            final["stopped_early"] = stopped
        else:
            run_callbacks(callbacks, steps, model, final)
        log.write(json.dumps(final) + "\n")

    if model.config._attn_implementation != attention_before:  # generation after training is faster on SDPA
        model.set_attn_implementation(attention_before)

    def finish() -> tuple[Path, int, int]:
        ensure_finite(model)
        return (save_output(model, tokenizer, config, run_dir), *count_parameters(model))

    # under torchrun rank 0 runs finish() with the gathered full weights; every rank gets its result
    output, trainable, total = sharding.with_full_weights(model, finish,
                                                             config.method.name in ("full", "freeze"))
    from tuneforge.report.plots import plot_loss

    result = TrainResult(run_dir=run_dir, steps=steps, final_loss=loss_value, val_loss=val,
                         trained_tokens=trained_tokens, seconds=time.perf_counter() - t0,
                         trainable=trainable, total=total, output=output,
                         loss_png=distributed.on_main(plot_loss, metrics_path, run_dir / "plots" / "loss.png"),
                         metrics=records)
    say(summary_table(result))
    distributed.barrier()  # every process leaves together
    return result


def forgetting_callbacks(config: RunConfig, model: torch.nn.Module, tokenizer: Any,
                         say: Callable[..., None]) -> tuple[EvalCallback, ...]:
    """The forgetting tracker of ``train.forgetting``, its baseline measured before the first step."""
    f = config.train.forgetting
    if f is None:
        return ()
    from tuneforge.eval.forgetting import ForgettingCallback

    cb = ForgettingCallback(tokenizer, general_text=f.general_text, n_probes=f.n_probes, max_tokens=f.max_tokens,
                            threshold_pct=f.threshold_pct, probe_drop_points=f.probe_drop_points, action=f.action,
                            log=say)
    cb.set_baseline(model)  # before any step: LoRA's B is still zero, full/freeze weights untouched
    return (cb,)


def run_callbacks(callbacks: tuple[EvalCallback, ...], step: int, model: torch.nn.Module,
                  record: dict[str, Any]) -> str | None:
    """Add each callback's metrics to ``record``; the reason when one asks to stop (StopTraining)."""
    for cb in callbacks:
        try:
            record.update(cb(step, model))
        except StopTraining as e:
            return str(e)
    return None


def grad_norm_of(params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad.norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.tensor(0.0)


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
        from tuneforge.adapters.peft_format import save_adapter

        return save_adapter(model, run_dir / "adapter", base_model_name_or_path=config.model)
    out = run_dir / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def report_data(data: TrainData, say: Callable[..., None]) -> None:
    say(f"[tuneforge] data: {data.n_train_examples} train examples in {len(data.train_rows)} rows "
        f"({data.n_train_tokens} tokens), {data.n_val_examples} validation examples"
        + (f", {len(data.held_out)} held out" if data.held_out else ""))
    if data.skipped:
        say(f"[tuneforge] skipped {len(data.skipped)} bad records, e.g.:")
        for loc, why in data.skipped[:5]:
            say(f"    {loc}: {why.splitlines()[0]}")


def summary_table(r: TrainResult) -> str:
    rows = [
        ("run directory", str(r.run_dir)),
        ("steps", str(r.steps)),
        ("final train loss", f"{r.final_loss:.4f}"),
        ("validation loss", f"{r.val_loss:.4f}" if r.val_loss is not None else "-"),
        ("trained tokens", f"{r.trained_tokens:,}"),
        ("time", f"{r.seconds:.1f} s"),
        ("trainable params", f"{r.trainable:,} of {r.total:,} ({100 * r.trainable / max(r.total, 1):.3f}%)"),
        ("output", str(r.output)),
        ("loss curve", str(r.loss_png) if r.loss_png else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "summary", "-" * (width + 40)] + [f"{k:<{width}}  {v}" for k, v in rows])
