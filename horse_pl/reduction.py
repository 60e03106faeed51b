"""How sums cross processes: one object that says whether it is distributed, instead of comparing a function
with a private identity.

``LOCAL`` (one process) returns its argument; ``Reduction(fn)`` sums with ``fn`` (``distributed()``: the
differentiable ``torch.distributed`` all-reduce, so the spread's backward pass is global too; tests pass a fake
sum across threads). Every stage takes one as ``all_reduce`` and calls it on the partial sums it needs globally.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class Reduction:
    """A sum across processes (``fn``), or none (``fn=None``: one process)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self._fn = fn

    @property
    def is_distributed(self) -> bool:
        return self._fn is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._fn is None else self._fn(x)

    sum = __call__


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(x)


LOCAL = Reduction()


def distributed() -> Reduction:
    """The sum over every process of the default ``torch.distributed`` group."""
    return Reduction(_all_reduce)
