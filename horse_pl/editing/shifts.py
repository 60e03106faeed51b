"""Apply parameter shifts functionally (``y = x W + x dW``) and merge them into weights on request.

While training and evaluating, each shift stays a separate fp32 tensor added through a forward hook,
so applying and reverting never round the base weights and ``dL/d(dW)`` is simply ``dW.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from horse_pl.edit_modules import weight_in_out


def shift_hook(shift: torch.Tensor):
    """A forward hook making a module compute ``output + input @ shift`` (shift in (d_in, d_out))."""
    def hook(module, inputs, output):
        return output + (inputs[0].to(shift.dtype) @ shift).to(output.dtype)
    return hook


@contextmanager
def applied(modules: Sequence[nn.Module], shifts: Sequence[torch.Tensor]):
    """Inside the block, each module computes ``output + input @ shift`` (shift in (d_in, d_out))."""
    handles = [m.register_forward_hook(shift_hook(s)) for m, s in zip(modules, shifts)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def merge(modules: Sequence[nn.Module], shifts: Sequence[torch.Tensor], sign: float = 1.0) -> None:
    """Add (``sign=1``) or subtract (``sign=-1``) the shifts into the modules' weights, in their dtype."""
    for module, shift in zip(modules, shifts):
        view = weight_in_out(module)
        view.copy_((view.to(torch.float32) + sign * shift.to(torch.float32)).to(view.dtype))
