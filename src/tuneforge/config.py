"""One pydantic object describes a run: YAML in, CLI overrides, the resolved YAML saved in the run dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tuneforge.errors import ConfigError

DEFAULT_LR = {"full": 1e-5, "freeze": 2e-5, "lora": 2e-4, "qlora": 2e-4}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSpec(Strict):
    """One dataset of a mixture: a file (or ``builtin:tasks``) with its format and weight."""

    path: str
    format: str = "auto"
    fields: dict[str, str] | None = None
    weight: float = Field(1.0, gt=0)
    max_examples: int | None = Field(None, gt=0)
    task: str | None = None
    tasks: list[str] | None = Field(None, description="keep only these tasks (names or globs)")


class ReplaySpec(Strict):
    """General text mixed into training against forgetting: ``ratio`` general rows per task row."""

    path: str
    ratio: float = Field(0.1, gt=0, le=1)
    skip_tokens: int = Field(0, ge=0, description="keep a perplexity-measuring prefix out of training")


class DataConfig(Strict):
    train: list[DatasetSpec] = Field(default_factory=lambda: [DatasetSpec(path="builtin:tasks")])
    eval: list[DatasetSpec] = Field(default_factory=list)
    val_fraction: float = Field(0.05, ge=0, lt=1)
    holdout_tasks: list[str] = Field(default_factory=list)
    max_seq_len: int = Field(512, ge=16)
    packing: bool = True
    train_on_prompt: bool = False
    skip_bad: bool = False
    replay: ReplaySpec | None = None

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _paths_as_specs(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        return [{"path": x} if isinstance(x, str) else x for x in v]


class LoraSettings(Strict):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_rslora: bool = False


class FreezeSettings(Strict):
    top_k_layers: int | None = Field(None, gt=0)
    layers: list[int] | None = None
    patterns: list[str] | None = None


class QuantSettings(Strict):
    """The frozen base of ``qlora``: 4-bit blocks of 64 with absmax scales (double-quantized)."""

    quant_type: Literal["nf4", "fp4", "int4"] = "nf4"
    double_quant: bool = True


class MethodConfig(Strict):
    name: Literal["full", "freeze", "lora", "qlora"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    quant: QuantSettings = Field(default_factory=QuantSettings)
    freeze: FreezeSettings = Field(default_factory=lambda: FreezeSettings(top_k_layers=2))


class ForgettingSettings(Strict):
    """Track forgetting during training (every ``train.eval_every`` steps and at the end)."""

    general_text: str | None = Field(None, description="perplexity on this text file; None: probes only")
    n_probes: int = Field(100, ge=0, description="general-knowledge probes scored by log-likelihood")
    max_tokens: int = Field(2048, gt=0, description="tokens of general text measured")
    threshold_pct: float | None = Field(10.0, description="perplexity rise over the base that triggers action")
    probe_drop_points: float | None = Field(None, gt=0, description="probe accuracy drop that triggers action")
    action: Literal["warn", "stop"] = "warn"


class TrainConfig(Strict):
    lr: float | None = Field(None, gt=0, description="None: the method's default (lora 2e-4, full 1e-5)")
    max_steps: int | None = Field(None, gt=0, description="None: run `epochs` over the data")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    warmup_steps: int | None = Field(None, ge=0, description="None: 5% of the steps")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    gradient_checkpointing: bool | Literal["auto", "off", "on", "offload"] = Field(
        "auto", description="auto: the planner decides on a GPU (off when it fits), off on the CPU; offload: "
                            "checkpointed layer inputs kept in host memory (the memory-lean mode)")
    loss_chunk_tokens: int = Field(1024, gt=0)
    kernels: Literal["auto", "torch", "liger"] = Field(
        "auto", description="liger: Liger's RMSNorm/SwiGLU Triton kernels (GPU, pip install liger-kernel); "
                            "auto: liger when on a GPU with it installed")
    eval_every: int | None = Field(None, gt=0)
    save_every: int | None = Field(None, gt=0)
    log_every: int = Field(1, gt=0)
    threads: int | None = Field(None, gt=0)
    forgetting: ForgettingSettings | None = None


class RunConfig(Strict):
    """Everything a run needs; every key can be set with ``--set section.key=value``."""

    model: str = "smollm2-135m"
    output_dir: str = "runs/run"
    trust_remote_code: bool = False
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else DEFAULT_LR[self.method.name]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults), apply ``key.path=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys (model:, data:, ...)")
    for item in overrides or []:
        set_key(raw, item)
    return validate(raw, source=str(path) if path else "config")


def set_key(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    node[parts[-1]] = yaml.safe_load(value) if value != "" else None


def validate(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig, turning pydantic errors into one message naming each bad key."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key (check the spelling; see README 'Config keys')")
            else:
                lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{source}: invalid configuration:\n" + "\n".join(lines)) from None


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config (defaults filled in) as YAML."""
    data = config.model_dump(mode="json")
    data["train"]["lr"] = config.lr
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
