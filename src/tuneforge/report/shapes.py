"""Parameter counts of Llama-style decoder shapes, and of LoRA on them, computed from the shapes alone."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: GQA attention, SwiGLU MLP, RMSNorm."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every Linear in one block: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def total_params(self) -> int:
        block = sum(a * b for a, b in self.linears()) + 2 * self.hidden  # + two RMSNorm weights
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return embed + self.layers * block + self.hidden

    def lora_params(self, r: int) -> int:
        """LoRA on all linear layers but the output head: r × (in + out) per Linear."""
        return self.layers * sum(r * (a + b) for a, b in self.linears())


SMOLLM2_135M = Shape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, True)
LLAMA2_7B = Shape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, False)
LLAMA2_70B = Shape("Llama-2-70B", 8192, 28672, 80, 64, 8, 32000, False)
SHAPES = (SMOLLM2_135M, LLAMA2_7B, LLAMA2_70B)


def lora_table(ranks: tuple[int, ...] = (8, 16, 32, 64)) -> list[dict]:
    """One row per (shape, rank): total parameters, LoRA parameters and their share."""
    rows = []
    for s in SHAPES:
        total = s.total_params()
        for r in ranks:
            n = s.lora_params(r)
            rows.append({"model": s.name, "total": total, "r": r, "lora": n, "share_pct": 100 * n / total})
    return rows
