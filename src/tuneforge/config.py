"""One pydantic model per command: YAML in, named flags and ``--set key=value`` overrides, errors naming the key.

``RunConfig`` describes a training run (``tuneforge train``; its resolved YAML is saved in the run dir);
``EvalConfig``, ``AdviseConfig``, ``ServeConfig``, ``LabConfig``, ``UiConfig`` and ``PlanConfig`` describe the other
commands. ``docs/configuration.md`` is generated from these models (``tuneforge.config_docs``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tuneforge.errors import ConfigError

DEFAULT_LR = {"full": 1e-5, "freeze": 2e-5, "lora": 2e-4, "qlora": 2e-4}
THREADS_HELP = "CPU threads; null: the physical cores this process may use, or $OMP_NUM_THREADS (docs/cli.md)"
MODEL_HELP = "model reference: builtin name, local HF directory, .gguf file or hub id (docs/training.md)"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads true as 1: a number key given a boolean is refused instead."""
        items = v if isinstance(v, list) else [v]
        if any(isinstance(x, bool) for x in items) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean (true/false)")
        return v


def _numeric(annotation: Any) -> bool:
    """Whether a field takes numbers and not booleans: int, float, optional or list of them."""
    args = get_args(annotation)
    if bool in args or annotation is bool:
        return False
    return annotation in (int, float) or any(_numeric(a) for a in args)


DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _device(v: str) -> str:
    if not DEVICE.match(v):
        raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
    return v


def _comma_list(v: Any) -> Any:
    """``"a,b"`` (a named flag's value) as ``["a", "b"]``; lists pass through."""
    return [x.strip() for x in v.split(",")] if isinstance(v, str) else v


class DatasetSpec(Strict):
    """One dataset of a mixture: a file (or ``builtin:tasks``) with its format and weight."""

    path: str = Field(description="a data file (.jsonl, .json, .csv, .parquet, .txt), `builtin:tasks`, or "
                                  "`builtin:preferences` (pairs, for a preference objective)")
    format: str = Field("auto", description="alpaca, dolly, prompt_completion, messages, sharegpt, oasst, text; "
                                            "preference pairs: prompt_chosen_rejected, messages_pairs, hh_rlhf; "
                                            "auto: detected from the first record")
    fields: dict[str, str] | None = Field(None, description="canonical field name → your column name")
    weight: float = Field(1.0, gt=0, description="contributes weight × its size examples (<1 subsamples, "
                                                 ">1 repeats)")
    max_examples: int | None = Field(None, gt=0, description="cap on the examples taken (applied first)")
    task: str | None = Field(None, description="task name of every record (else the record's task/dataset field)")
    tasks: list[str] | None = Field(None, description="keep only these tasks (names or globs)")


class ReplaySpec(Strict):
    """General text mixed into training against forgetting: ``ratio`` general rows per task row."""

    path: str = Field(description="a plain-text file of general text")
    ratio: float = Field(0.1, gt=0, le=1, description="general-text rows per task row")
    skip_tokens: int = Field(0, ge=0, description="keep a perplexity-measuring prefix out of training")


class DataConfig(Strict):
    """What the run trains on and validates with."""

    train: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(path="builtin:tasks")],
                                     description="paths, or datasets with the keys below (a mixture)")
    eval: list[DatasetSpec] = Field(default_factory=list,
                                    description="validation files (else `val_fraction` of train)")
    val_fraction: float | None = Field(None, ge=0, lt=1, description="share of training examples held for "
                                       "validation; null: from the data size (none under 100 examples, else 5% "
                                       "kept within 10..1000)")
    holdout_tasks: list[str] = Field(default_factory=list, description="task names/globs removed from training")
    max_seq_len: int = Field(512, ge=16, description="row length in tokens; longer examples are errors "
                                                     "(or skipped with skip_bad)")
    packing: bool = Field(True, description="pack several examples per row (attention stays inside each)")
    train_on_prompt: bool = Field(False, description="also train on system/user turns")
    skip_bad: bool = Field(False, description="skip bad records and report their count and locations")
    replay: ReplaySpec | None = Field(None, description="general text mixed into training (against forgetting)")

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _paths_as_specs(cls, v: Any) -> Any:
        if isinstance(v, str | dict):  # one path, or one dataset written without the list
            v = [v]
        return [{"path": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v


class LoraSettings(Strict):
    """LoRA adapters ``W' = W + (alpha/r)·B·A`` (``lora`` and ``qlora``)."""

    r: int = Field(16, gt=0, description="rank")
    alpha: float = Field(32, gt=0, description="scale numerator (alpha/r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module name suffixes, e.g. [q_proj, v_proj]; all-linear: every Linear but "
                                  "the output head")
    target_parameters: list[str] | None = Field(
        None, description="MoE parameters to adapt (peft's target_parameters), e.g. [experts.gate_up_proj, "
                          "experts.down_proj, mlp.gate.weight]; null: the expert weights with all-linear (routers "
                          "left out), none otherwise; no dropout on them (docs/models.md)")
    use_rslora: bool = Field(False, description="scale by alpha/√r")
    use_dora: bool = Field(False, description="DoRA: a trained magnitude per output row on top of LoRA's direction "
                                              "(saved in peft's layout; docs/adapters-and-serving.md)")
    base_precision: Literal["bf16", "fp8"] = Field(
        "bf16", description="the frozen base's GEMMs: fp8 runs them in FP8 with per-channel scales; lora stores the "
                            "weights as e4m3, qlora keeps them 4-bit and makes e4m3 codes on the fly (CUDA compute "
                            "capability 8.9+: L4, H100, H200; docs/gpu-speed.md)")
    group_projections: bool = Field(
        True, description="one GEMM for the LoRA A of projections that share an input (q/k/v, gate/up) when LoRA "
                          "dropout is 0 (with dropout each keeps its own mask, as peft); false: one per projection")
    init_adapter: str | None = Field(None, description="start from this PEFT adapter directory (e.g. an SFT run's "
                                                       "adapter/) and train it further; its own r, alpha, targets, "
                                                       "target_parameters, dropout, use_rslora and use_dora replace "
                                                       "the ones above, which the log lists (docs/preference.md)")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        return v if v == "all-linear" else _comma_list(v)

    @field_validator("target_parameters", mode="before")
    @classmethod
    def _parameters(cls, v: Any) -> Any:
        return v if v is None else _comma_list(v)


class FreezeSettings(Strict):
    """What trains with ``freeze`` (partial fine-tuning); everything else stays frozen."""

    top_k_layers: int | None = Field(None, gt=0, description="the last k decoder blocks")
    layers: list[int] | None = Field(None, description="decoder block indices (negative allowed)")
    patterns: list[str] | None = Field(None, description='module name globs, e.g. "*.mlp.*", lm_head')


class QuantSettings(Strict):
    """The frozen base of ``qlora``: 4-bit blocks of 64 with absmax scales (double-quantized)."""

    quant_type: Literal["nf4", "fp4", "int4"] = Field("nf4", description="the 4-bit code book")
    double_quant: bool = Field(True, description="quantize the absmax scales to 8 bits too")


class MethodConfig(Strict):
    """How the model trains."""

    name: Literal["full", "freeze", "lora", "qlora"] = Field("lora", description="what trains (docs/training.md)")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (lora, qlora)")
    quant: QuantSettings = Field(default_factory=QuantSettings, description="4-bit base settings (qlora)")
    freeze: FreezeSettings = Field(default_factory=lambda: FreezeSettings(top_k_layers=2),
                                   description="what trains with freeze")

    @model_validator(mode="after")
    def _fp8_base(self) -> MethodConfig:
        if self.lora.base_precision != "fp8":
            return self
        if self.name not in ("lora", "qlora"):
            raise ValueError(f"method.lora.base_precision=fp8 is for method.name=lora or qlora (the base of "
                             f"{self.name} is trained); set method.lora.base_precision=bf16")
        if self.lora.use_dora:
            raise ValueError("method.lora.use_dora=true with method.lora.base_precision=fp8 is not supported (DoRA "
                             "reads the dense base weight at every step); set method.lora.base_precision=bf16")
        return self


class ForgettingSettings(Strict):
    """Track forgetting during training (every ``train.eval_every`` steps and at the end)."""

    general_text: str | None = Field(None, description="perplexity on this text file; null: probes only")
    n_probes: int = Field(100, ge=0, description="general-knowledge probes scored by log-likelihood")
    max_tokens: int = Field(2048, gt=0, description="tokens of general text measured")
    threshold_pct: float | None = Field(10.0, description="perplexity rise over the base that triggers action")
    probe_drop_points: float | None = Field(None, gt=0, description="probe accuracy drop that triggers action")
    action: Literal["warn", "stop"] = Field("warn", description="warn, or stop the run (and save what it has)")


class PreferenceConfig(Strict):
    """Preference tuning (``train.objective`` dpo, ipo, orpo, simpo): the objective's constants and the reference."""

    beta: float | None = Field(None, gt=0, description="DPO/IPO/SimPO temperature; null: 0.1 (dpo, ipo), "
                                                       "2.0 (simpo); unused by orpo")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO/SimPO: the share of pairs "
                                                                  "assumed mislabeled")
    simpo_gamma: float = Field(0.5, description="SimPO's target reward margin")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO: weight of the odds-ratio term beside the NLL")
    reference: Literal["auto", "adapters_off", "model", "precomputed"] = Field(
        "auto", description="the DPO/IPO reference: adapters_off (lora/qlora: the base, no second copy), model "
                            "(full/freeze: a frozen copy), precomputed (one pass over the data before step 1); "
                            "auto: adapters_off for a fresh adapter, else precomputed")
    share_prompt: bool = Field(True, description="with data.packing: each pair is one document [prompt | chosen | "
                                                 "rejected], the prompt computed once (models with sliding-window "
                                                 "or other non-full attention keep two documents)")


class TrainConfig(Strict):
    """The optimization: length, batch, learning rate, precision, speed and what is measured on the way."""

    objective: Literal["sft", "dpo", "ipo", "orpo", "simpo"] = Field(
        "sft", description="sft: next-token loss on answers; dpo/ipo/orpo/simpo: preference pairs "
                           "(settings under `preference`, docs/preference.md)")
    lr: float | None = Field(None, gt=0, description="peak learning rate; null: the method's default "
                                                     "(lora/qlora 2e-4, freeze 2e-5, full 1e-5)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; null: run `epochs` over the data")
    epochs: float | None = Field(None, gt=0, description="passes over the data (max_steps wins); null: from the "
                                 "data size (1 when an epoch has 100+ steps, else enough for 100 steps, at most 10)")
    batch_size: int = Field(8, gt=0, description="rows per micro-batch, pairs for a preference objective (global: "
                                                 "split over torchrun processes)")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    warmup_steps: int | None = Field(None, ge=0, description="linear warm-up; null: 5% of the steps")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warm-up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the decay ends at this share of the peak")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null: off")
    seed: int = Field(0, description="data order, init and dropout")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: fp32 on the CPU, bf16 autocast "
                                                                       "on a GPU")
    weights: Literal["fp32_master", "bf16_kahan", "bf16_stochastic"] = Field(
        "fp32_master", description="fp32_master: fp32 weights under AdamW; bf16_kahan / bf16_stochastic (full, "
                                   "freeze): bf16 weights, no fp32 copy, AdamW updates Kahan-compensated (2 bytes "
                                   "a parameter more) or stochastically rounded so small updates are kept "
                                   "(docs/training.md)")
    optimizer_state: Literal["fp32", "bf16"] = Field(
        "fp32", description="AdamW moments with bf16 weights: bf16 (stored with stochastic rounding) saves 4 bytes "
                            "a parameter")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    gradient_checkpointing: bool | Literal["auto", "off", "on", "offload"] = Field(
        "auto", description="auto: the planner decides on a GPU (off when it fits), off on the CPU; offload: "
                            "checkpointed layer inputs kept in host memory (the memory-lean mode)")
    loss_chunk_tokens: int = Field(256, gt=0, description="tokens per chunk of the fused linear + "
                                                           "cross-entropy (full logits are never built)")
    kernels: Literal["auto", "torch", "liger"] = Field(
        "auto", description="liger: Liger's RMSNorm/SwiGLU Triton kernels (GPU, pip install liger-kernel); "
                            "auto: liger when on a GPU with it installed")
    compile: bool = Field(False, description="torch.compile each decoder layer (GPU; the first steps wait for "
                                             "the compiler, its time is reported apart; docs/gpu-speed.md)")
    eval_every: int | None = Field(None, gt=0, description="steps between validation (and forgetting) points")
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints")
    log_every: int = Field(1, gt=0, description="steps between metric lines")
    threads: int | None = Field(None, gt=0, description=THREADS_HELP)
    forgetting: ForgettingSettings | None = Field(None, description="track forgetting (docs/evaluation.md)")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="experiment trackers that also receive every metrics record")

    _device = field_validator("device")(_device)


class RunConfig(Strict):
    """`tuneforge train`: everything a run needs; every key can be set with ``--set section.key=value``."""

    model: str = Field("smollm2-135m", description=MODEL_HELP)
    output_dir: str = Field("runs/run", description="the run directory (--overwrite replaces an existing one)")
    trust_remote_code: bool = Field(False, description="passed to transformers")
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention"] = Field(
        "auto", description="attention kernel: auto = SDPA where transformers has it for the architecture, else "
                            "eager (docs/models.md); packed rows on a GPU switch to flex_attention")
    data: DataConfig = Field(default_factory=DataConfig, description="the data")
    method: MethodConfig = Field(default_factory=MethodConfig, description="the fine-tuning method")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the optimization")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         description="preference objectives (train.objective dpo, ipo, orpo, simpo)")

    @property
    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else DEFAULT_LR[self.method.name]

    @model_validator(mode="after")
    def _bf16_weights(self) -> RunConfig:
        t = self.train
        if t.weights == "fp32_master":
            if t.optimizer_state != "fp32":
                raise ValueError("train.optimizer_state=bf16 needs bf16 weights: set train.weights=bf16_kahan "
                                 "(or bf16_stochastic), or leave optimizer_state fp32")
            return self
        if self.method.name not in ("full", "freeze"):
            raise ValueError(f"train.weights={t.weights} is for method full or freeze (LoRA adapters train in "
                             f"fp32 over a bf16 base already); set train.weights=fp32_master for {self.method.name}")
        if t.dtype == "fp32":
            raise ValueError(f"train.weights={t.weights} computes in bf16, train.dtype=fp32 asks for fp32; "
                             "set train.dtype=auto (or bf16), or train.weights=fp32_master")
        return self


class EvalConfig(Strict):
    """`tuneforge eval`: the base model and each adapter side by side on one data file."""

    model: str = Field("smollm2-135m", description="base " + MODEL_HELP)
    data: str = Field(description="evaluation file (any training format) or builtin:tasks|refusal|probes")
    format: str = Field("auto", description="the data format (as in data.train); auto: detected")
    adapters: list[str] = Field(default_factory=list, description="PEFT-format adapter directories")
    metrics: list[str] | None = Field(
        None, description="exact, normalized, contains, regex, json, json_schema, mc, loss, refusal; "
                          "null: what the data supports")
    pattern: str | None = Field(None, description="regular expression for the regex metric "
                                                  "(else each record's pattern)")
    schema_file: str | None = Field(None, description="JSON Schema file for json_schema (else each record's schema)")
    refusal_detector: str | None = Field(None, description="package.module:function replacing the default "
                                                           "refusal detector")
    limit: int | None = Field(None, gt=0, description="evaluate N records, evenly spread over the file")
    max_new_tokens: int | None = Field(None, gt=0, description="null: the longest reference + 8")
    batch_size: int = Field(16, gt=0, description="prompts generated together")
    system: str | None = Field(None, description="system prompt for every record")
    include_base: bool = Field(True, description="also evaluate the base model alone")
    output: str = Field("runs/eval", description="where results.json, predictions.jsonl and the PNGs go")
    threads: int | None = Field(None, gt=0, description=THREADS_HELP)


class AdviseConfig(Strict):
    """`tuneforge advise`: prompting (zero-/few-shot, your prompt) against a short LoRA fine-tune."""

    data: str = Field(description="your task: records with prompts and reference answers")
    model: str = Field("smollm2-135m", description=MODEL_HELP)
    shots: list[int] = Field([1, 3, 5], description="few-shot sizes k (a flag takes 1,3,5)")
    prompt_file: str | None = Field(None, description="your better prompt: a system prompt, or a user template "
                                                      "with {input}")
    metric: Literal["exact", "normalized", "contains", "regex", "json", "json_schema"] = Field(
        "normalized", description="how an answer is scored against the reference")
    n_test: int = Field(50, gt=0, description="test records (at most half of the data)")
    train_steps: int = Field(60, gt=0, description="LoRA fine-tuning steps")
    lr: float = Field(5e-4, gt=0, description="LoRA learning rate")
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    batch_size: int = Field(2, gt=0, description="training rows per step")
    max_seq_len: int = Field(512, ge=16, description="training row length in tokens")
    price_per_1k_tokens: float = Field(0.0005, ge=0, description="$ per 1k prompt tokens")
    output_price_per_1k_tokens: float | None = Field(None, ge=0, description="$ per 1k output tokens; "
                                                                             "null: the prompt price")
    finetuned_price_multiplier: float = Field(1.0, gt=0, description="price factor of the fine-tuned model "
                                                                     "(hosted fine-tunes often cost 1.5-2x)")
    gpu_hour_price: float = Field(2.0, ge=0, description="$ per hour of the hardware that trains")
    expected_requests: float = Field(1_000_000, gt=0, description="request volume you expect")
    latency_requests: int = Field(8, gt=0, description="requests timed one at a time for latency")
    max_new_tokens: int | None = Field(None, gt=0, description="null: from the longest reference")
    output: str = Field("runs/advise", description="where advise.md, advise.json and crossover.png go")
    seed: int = Field(0, description="record split and training seed")
    threads: int | None = Field(None, gt=0, description=THREADS_HELP)

    @field_validator("shots", mode="before")
    @classmethod
    def _shots(cls, v: Any) -> Any:
        return _comma_list(v)


class ServeConfig(Strict):
    """`tuneforge serve`: an OpenAI-compatible HTTP API over one base model and a folder of adapters."""

    model: str = Field(description="base " + MODEL_HELP)
    adapters: str = Field(description="folder of adapter folders; add or remove them while it runs")
    host: str = Field("127.0.0.1", description="bind address (loopback only unless changed)")
    port: int = Field(8000, description="TCP port")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY'; null: $TUNEFORGE_API_KEY "
                                                  "if set, else no key")
    max_batch: int = Field(8, description="requests run together in one generate call")
    max_tokens_limit: int = Field(512, description="largest max_tokens a request may ask")
    max_body_bytes: int = Field(1 << 20, description="larger request bodies get 413")
    max_queue: int = Field(256, description="prompts waiting for the model; beyond it new requests get 429")
    batch_wait_ms: float = Field(5.0, description="how long a batch collects requests")
    scan_interval_s: float = Field(2.0, description="how often the adapters folder is rescanned")
    read_timeout_s: float = Field(30.0, gt=0, description="seconds a client has to send a whole request; also the "
                                  "idle keep-alive limit")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype")
    device: str = Field("cpu", description="cpu or cuda")
    threads: int | None = Field(None, gt=0, description=THREADS_HELP)

    _device = field_validator("device")(_device)


class LabConfig(Strict):
    """`tuneforge lab`: each claim of the fine-tuning lesson measured on the builtin SmolLM2."""

    quick: bool = Field(False, description="the quick mode (about 10 min on 2 CPU cores; full: 45)")
    output: str = Field("runs/lab", description="where report.md, report.html, plots/ and lab.json go")
    general_text: str | None = Field(None, description="general text for perplexity; null: "
                                                       "../shared/data/general")
    threads: int | None = Field(None, gt=0, description=THREADS_HELP)


class UiConfig(Strict):
    """`tuneforge ui`: a local dashboard over run directories (it reads them and writes nothing)."""

    runs_dir: str = Field("runs", description="the folder the runs' output_dir folders are in")
    host: str = Field("127.0.0.1", description="bind address (loopback only unless changed)")
    port: int = Field(7860, description="TCP port")
    token: str | None = Field(None, description="require this token (given in the URL printed at start); "
                                                "null: none, fine on loopback only")
    serve_url: str = Field("http://127.0.0.1:8000", description="a `tuneforge serve` the chat page talks to")


class PlanConfig(RunConfig):
    """`tuneforge plan`: a run's predicted peak GPU memory; the keys of `train` plus these."""

    gpus: int = Field(1, gt=0, description="torchrun processes the batch and the state are split over")
    gpu_mem: float | None = Field(None, gt=0, description="GPU memory in GiB; null: this machine's GPU, if any")

    @model_validator(mode="after")
    def _batch_splits(self) -> PlanConfig:
        if self.train.batch_size % self.gpus:
            raise ValueError(f"train.batch_size {self.train.batch_size} is the global rows per micro-batch and "
                             f"must be divisible by --gpus {self.gpus}")
        return self


M = TypeVar("M", bound=BaseModel)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict[str, Any] | None = None, schema: type[M] = RunConfig,
                flag_names: dict[str, str] | None = None) -> M:
    """Build a command's config: YAML file (or the defaults) ← ``key.path=value`` overrides ← named flags.

    ``flags`` maps config keys to values already parsed (a named flag's); ``flag_names`` maps the same
    keys to the flag that set them, so an error names both.
    """
    raw = read_yaml(path) if path is not None else {}
    for item in overrides or []:
        set_key(raw, item)
    for key, value in (flags or {}).items():
        set_value(raw, key, value)
    return validate(raw, source=str(path) if path else "config", schema=schema, flag_names=flag_names)


class NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors and aliases: a 521-byte "billion laughs" of aliases expands to
    gigabytes, and a config never needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in a "
                                                          "tuneforge config; write the value out", event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """YAML text as Python values (safe types only, no aliases); too deep a nesting is a YAMLError too."""
    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply for a config") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a dict; a missing file, bad YAML or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8; save the config as UTF-8") from None
    try:
        raw = parse_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (model:, data:, ...)")
    return raw


def set_key(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    try:
        parsed = parse_yaml(value) if value != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: the value is not valid YAML ({str(e).splitlines()[0]}); quote it, e.g. "
                          f"--set '{key}=\"...\"'") from None
    set_value(raw, key.strip(), parsed, item)


def set_value(raw: dict[str, Any], key: str, value: Any, origin: str | None = None) -> None:
    """Set ``a.b.c`` in a nested dict, creating sections on the way."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{origin or key}': '{part}' is not a section")
    node[parts[-1]] = value


def validate(raw: dict[str, Any], source: str = "config", schema: type[M] = RunConfig,
             flag_names: dict[str, str] | None = None) -> M:
    """Build ``schema`` from a dict, turning pydantic errors into one message naming each bad key."""
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        lines = [_error_line(err, flag_names or {}) for err in e.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n" + "\n".join(lines)) from None


def _error_line(err: Any, flag_names: dict[str, str]) -> str:
    key = ".".join(str(x) for x in err["loc"])
    flag = next((flag_names[k] for k in _prefixes(key) if k in flag_names), None)
    named = f"{key} ({flag})" if flag else key
    if not key:
        return f"  {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "extra_forbidden":
        return f"  {named}: unknown key (check the spelling; the keys are in docs/configuration.md)"
    if err["type"] == "missing":
        return f"  {named}: required (set it in the config file, with its flag, or with --set {key}=...)"
    return f"  {named}: {err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"


def _prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config (defaults filled in) as YAML."""
    data = config.model_dump(mode="json")
    data["train"]["lr"] = config.lr
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
