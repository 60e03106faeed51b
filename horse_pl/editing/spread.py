"""The residual spread across edited layers: the HORSE contribution, as pluggable stages.

All stages take the per-layer residuals ``R_l`` (N x d_out, layers in depth order) and the captured
value gradients ``G_l``, and return the spread residuals ``R~_l``. Inner products are Frobenius
products over all rows; ``all_reduce`` (a sum across processes) makes them global under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from horse_pl.reduction import LOCAL, Reduction

AllReduce = Reduction  # the type every stage's ``all_reduce`` argument has


def _inner(a: torch.Tensor, b: torch.Tensor, all_reduce: AllReduce) -> torch.Tensor:
    return all_reduce((a * b).sum())


def _check_shapes(residuals: Sequence[torch.Tensor]) -> None:
    if len({tuple(r.shape[1:]) for r in residuals}) > 1:
        raise ValueError("The spread needs edit modules with the same output size; use spread: NoSpread "
                         "or edit modules of one shape.")


class Spread:
    """Base class: a named stage ``(residuals, value_grads) -> spread residuals``."""

    name = "base"

    def __call__(self, residuals: Sequence[torch.Tensor], value_grads: Sequence[torch.Tensor],
                 all_reduce: AllReduce = LOCAL) -> list[torch.Tensor]:
        raise NotImplementedError


class GramSchmidtSpread(Spread):
    """HORSE (our reading of the paper): each layer's residual made orthogonal to the previous layer's
    *spread* residual, ``R~_l = R_l - <R_l, R~_{l-1}> / ||R~_{l-1}||^2 * R~_{l-1}``.

    Args:
        eps: added to the squared norm; residuals are tiny (lr ~ 1e-6), so the default is the
            smallest normal float rather than a fixed 1e-8 that would switch the projection off.
    """

    name = "gram_schmidt"

    def __init__(self, eps: float = 1e-30):
        self.eps = eps

    def __call__(self, residuals, value_grads, all_reduce=LOCAL):
        _check_shapes(residuals)
        out = [residuals[0]]
        for r in residuals[1:]:
            prev = out[-1]
            coeff = _inner(r, prev, all_reduce) / (_inner(prev, prev, all_reduce) + self.eps)
            out.append(r - coeff * prev)
        return out


class ReferenceSpread(Spread):
    """What the authors' released code computes: the scalar ``<R_l, R_{l-1}> / ||R_{l-1}||^2`` against
    the previous layer's *unspread* residual, multiplying the previous layer's value gradient ``G_{l-1}``.
    Not orthogonal; kept to reproduce the released behaviour."""

    name = "reference"

    def __init__(self, eps: float = 1e-30):
        self.eps = eps

    def __call__(self, residuals, value_grads, all_reduce=LOCAL):
        _check_shapes(residuals)
        out = [residuals[0]]
        for layer in range(1, len(residuals)):
            prev, cur = residuals[layer - 1], residuals[layer]
            coeff = _inner(cur, prev, all_reduce) / (_inner(prev, prev, all_reduce) + self.eps)
            out.append(cur - coeff * value_grads[layer - 1].to(cur.dtype))
        return out


class NoSpread(Spread):
    """MALMEN / MEND: independent per-layer residuals."""

    name = "none"

    def __call__(self, residuals, value_grads, all_reduce=LOCAL):
        return list(residuals)


def layer_cosines(residuals: Sequence[torch.Tensor], all_reduce: AllReduce = LOCAL) -> list[float]:
    """Cosine between consecutive layers' residuals (a spread diagnostic)."""
    out = []
    for a, b in zip(residuals[:-1], residuals[1:]):
        if a.shape != b.shape:
            continue
        denom = (_inner(a, a, all_reduce) * _inner(b, b, all_reduce)).sqrt()
        out.append(float(_inner(a, b, all_reduce) / denom) if denom > 0 else 0.0)
    return out


def spread_diagnostics(residuals: Sequence[torch.Tensor], spread_residuals: Sequence[torch.Tensor],
                       layers: Sequence[int], all_reduce: AllReduce = LOCAL) -> dict[str, float]:
    """What the spread did, keyed by the edit modules' real layer indices: the cosine between consecutive
    edit layers' residuals before and after it (``cos_24_25/before``; pairs of different widths are skipped)
    and each layer's spread residual norm (``residual_norm/layer24``). Global under DDP (all-reduced sums)."""
    out: dict[str, float] = {}
    for i in range(len(residuals) - 1):
        if residuals[i].shape != residuals[i + 1].shape:
            continue
        pair = f"cos_{layers[i]}_{layers[i + 1]}"
        out[f"{pair}/before"] = layer_cosines(residuals[i:i + 2], all_reduce)[0]
        out[f"{pair}/after"] = layer_cosines(spread_residuals[i:i + 2], all_reduce)[0]
    for layer, r in zip(layers, spread_residuals):
        out[f"residual_norm/layer{layer}"] = float(all_reduce((r.float() ** 2).sum()).sqrt())
    return out
