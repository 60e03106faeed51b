"""Language-model passes that compute logits only where a label is (the answer positions).

A micro-batch is right-padded to its longest sequence. Before the forward pass its rows are split
into contiguous groups, each trimmed to its own longest sequence (:func:`row_groups`), so little
compute is spent on padding; with right padding and causal attention the real tokens' outputs do
not depend on how much padding follows them, so the results are those of the padded micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from horse_pl.data.tokenize import IGNORE_INDEX

# Cost of one extra forward call, in padded tokens (per-call overhead and smaller matrix products).
GROUP_OVERHEAD_TOKENS = 64


def row_groups(micro_batch: dict[str, torch.Tensor], overhead: int | None = None) -> list[dict]:
    """Split a right-padded micro-batch into contiguous row groups, each trimmed to its longest sequence.

    The split minimises padded tokens plus ``overhead`` per group (dynamic programming over split
    points); rows keep their order, so per-row results concatenate back in micro-batch order.
    ``overhead`` defaults to :data:`GROUP_OVERHEAD_TOKENS`.
    """
    overhead = GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    lengths = micro_batch["attention_mask"].sum(1).tolist()
    n = len(lengths)
    if n == 0:
        return []
    # best[j]: cost of rows [0, j); cut[j]: start of the last group in that solution
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        width = 0
        for i in range(j - 1, -1, -1):
            width = max(width, lengths[i])
            cost = best[i] + (j - i) * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    groups = []
    for start, end in reversed(bounds):
        width = max(lengths[start:end])
        groups.append({key: value[start:end, :width] for key, value in micro_batch.items()})
    return groups


def group_answer_logits(model: nn.Module, group: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and labels at the labelled positions of one row group, as (n_tokens, vocab) and (n_tokens,)."""
    mask = group["attention_mask"]
    hidden = model.base_model(
        input_ids=group["input_ids"], attention_mask=None if bool(mask.all()) else mask, use_cache=False
    ).last_hidden_state
    answer = group["labels"] != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[answer]).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, group["labels"][answer]


def answer_logits(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and labels at the labelled positions of a micro-batch, as (n_tokens, vocab) and (n_tokens,).

    Only the answer positions go through the output projection, which for small models with large
    vocabularies is a sizeable share of the forward pass; rows run in trimmed groups (:func:`row_groups`).
    """
    parts = [group_answer_logits(model, group) for group in row_groups(micro_batch)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def answer_ce(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a micro-batch."""
    logits, labels = answer_logits(model, micro_batch)
    return F.cross_entropy(logits, labels)
