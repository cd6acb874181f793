"""Preference accuracy: how often a model already prefers the chosen answer of a pair.

A model's implicit preference is the answer it gives the higher log-probability. Two columns:
``preference_acc`` compares the summed log-probs of the two answers (what DPO's reward compares, the reference
cancelling out between variants scored alike), ``preference_acc_avg`` the per-token averages (length-fair,
what SimPO and ORPO compare). Both answers of each pair go through one forward, log-probs from the fused
chunked head (no full-vocabulary logits).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from tuneforge.data.preference import TokenizedPair, collate_pairs
from tuneforge.eval.results import ModelEval
from tuneforge.models.load import pad_token_id
from tuneforge.train.preference import batch_logps, split_pairs

COLUMNS = ("preference_acc", "preference_acc_avg")


@torch.no_grad()
def pair_logps(model: torch.nn.Module, tokenizer, pairs: list[TokenizedPair],
               batch_size: int = 16) -> list[tuple[float, float, int, int]]:
    """``(chosen logp, rejected logp, chosen tokens, rejected tokens)`` of each pair, in order."""
    was_training = model.training
    model.eval()
    out: list[tuple[float, float, int, int]] = []
    try:
        for i in range(0, len(pairs), batch_size):
            logps, counts = batch_logps(model, collate_pairs(pairs[i:i + batch_size], pad_token_id(tokenizer)))
            (c, r), (nc, nr) = split_pairs(logps), split_pairs(counts)
            out += zip(c.tolist(), r.tolist(), nc.tolist(), nr.tolist(), strict=True)
    finally:
        model.train(was_training)
    return out


def preference_eval(model: torch.nn.Module, tokenizer, pairs: list[TokenizedPair], name: str = "model",
                    batch_size: int = 16) -> ModelEval:
    """Preference accuracy (summed and per-token log-probs) of one model variant, overall and per task."""
    hits: dict[str, dict[str, list[bool]]] = {c: defaultdict(list) for c in COLUMNS}
    for pair, (c, r, nc, nr) in zip(pairs, pair_logps(model, tokenizer, pairs, batch_size), strict=True):
        task = pair.task or "default"
        hits["preference_acc"][task].append(c > r)
        hits["preference_acc_avg"][task].append(c / max(nc, 1) > r / max(nr, 1))
    result = ModelEval(name=name, n=len(pairs))
    for col, by_task in hits.items():
        flat = [h for hs in by_task.values() for h in hs]
        result.overall[col] = sum(flat) / max(len(flat), 1)
        result.per_task[col] = {t: sum(h) / len(h) for t, h in sorted(by_task.items())}
    return result
