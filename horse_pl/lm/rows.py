"""Row groups: a right-padded micro-batch split into contiguous groups, each trimmed to its longest sequence.

With right padding and causal attention the real tokens' outputs do not depend on how much padding follows
them, so passes over the groups give the results of the padded micro-batch with little compute spent on padding.
"""

from __future__ import annotations

import torch

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
