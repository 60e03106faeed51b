"""A token prefix shared by every row of a row group (a template such as zsRE's ``nq question:``).

It runs once, as a one-row pass whose keys and values every row then attends to; with causal attention the
rows' outputs are those of the full pass.
"""

from __future__ import annotations

import torch

from horse_pl.data.tokenize import IGNORE_INDEX
from horse_pl.lm import rows as _rows


def shared_prefix_length(group: dict[str, torch.Tensor], overhead: int | None = None) -> int:
    """Length of the token prefix that every row of a right-padded row group starts with, when sharing it
    pays: no labelled position inside it, at least one token of every row after it, and the tokens it
    saves (``length x (rows - 1)``) above ``overhead`` (default
    :data:`horse_pl.lm.rows.GROUP_OVERHEAD_TOKENS`); else 0."""
    overhead = _rows.GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    ids, mask = group["input_ids"], group["attention_mask"]
    rows = ids.shape[0]
    if rows < 2:
        return 0
    shared = (ids == ids[:1]).all(0) & mask.bool().all(0) & (group["labels"] == IGNORE_INDEX).all(0)
    length = int(shared.int().cumprod(0).sum())
    length = min(length, int(mask.sum(1).min()) - 1)
    return length if length * (rows - 1) > overhead else 0
