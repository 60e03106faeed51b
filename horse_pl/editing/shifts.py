"""Apply parameter shifts functionally (``y = x (W + dW)``) and merge them into weights on request.

While training and evaluating, each shift stays a separate fp32 tensor that the module adds to its
weight on the fly, so applying and reverting never round the base weights and ``dL/d(dW)`` is simply
``dW.grad``. A module whose weight is in the shift's dtype multiplies by ``W + dW`` (one matrix product
instead of two, and one fewer in the backward pass); a lower-precision module (bf16) keeps ``x W`` in
its dtype and adds ``x dW`` computed in the shift's dtype, so small shifts are not rounded away.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from horse_pl.edit_modules import forward_replaced, weight_in_out


def shift_hook(shift: torch.Tensor):
    """A forward hook making a module compute ``output + input @ shift`` (shift in (d_in, d_out))."""
    def hook(module, inputs, output):
        return output + (inputs[0].to(shift.dtype) @ shift).to(output.dtype)
    return hook


def _shifted_forward(module: nn.Module, shift: torch.Tensor):
    """A replacement ``forward`` computing ``input @ (W + shift) + bias`` (W and shift in (d_in, d_out))."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, (weight_in_out(module) + shift).T, module.bias)
    return forward


@contextmanager
def applied(modules: Sequence[nn.Module], shifts: Sequence[torch.Tensor]):
    """Inside the block, each module computes ``input @ (W + shift)`` (shift in (d_in, d_out)); the
    module's weight is never written."""
    with ExitStack() as stack:
        for module, shift in zip(modules, shifts):
            if module.weight.dtype == shift.dtype and module.weight.device == shift.device:
                stack.enter_context(forward_replaced(module, _shifted_forward(module, shift)))
            else:
                stack.callback(module.register_forward_hook(shift_hook(shift)).remove)
        yield


@torch.no_grad()
def merge(modules: Sequence[nn.Module], shifts: Sequence[torch.Tensor], sign: float = 1.0) -> None:
    """Add (``sign=1``) or subtract (``sign=-1``) the shifts into the modules' weights, in their dtype."""
    for module, shift in zip(modules, shifts):
        view = weight_in_out(module)
        view.copy_((view.to(torch.float32) + sign * shift.to(torch.float32)).to(view.dtype))
