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


def shift_hook(shift: torch.Tensor, mask: torch.Tensor | None = None):
    """A forward hook making a module compute ``output + input @ shift`` (shift in (d_in, d_out)); with ``mask``
    (batch x seq, the module input's leading dimensions) only where it is True."""
    def hook(module, inputs, output):
        change = inputs[0].to(shift.dtype) @ shift
        if mask is not None:
            change = change * mask.unsqueeze(-1).to(shift.dtype)
        return output + change.to(output.dtype)
    return hook


def _shifted_forward(module: nn.Module, shift: torch.Tensor):
    """A replacement ``forward`` computing ``input @ (W + shift) + bias`` (W and shift in (d_in, d_out))."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, (weight_in_out(module) + shift).T, module.bias)
    return forward


@contextmanager
def applied_at(modules: Sequence[nn.Module], shifts: Sequence[torch.Tensor], mask: torch.Tensor):
    """Like :func:`applied`, but each shift changes the module's output only at the positions ``mask`` marks
    (batch x seq): MEMIT's value optimisation, which edits the hidden state at the subject's last token alone."""
    with ExitStack() as stack:
        for module, shift in zip(modules, shifts):
            stack.callback(module.register_forward_hook(shift_hook(shift, mask)).remove)
        yield


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


def merged_weight(weight: torch.Tensor, shift: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """``weight + sign * shift`` computed in fp32 and rounded to the weight's dtype: what :func:`merge` writes."""
    return (weight.to(torch.float32) + sign * shift.to(torch.float32)).to(weight.dtype)


@torch.no_grad()
def merge(modules: Sequence[nn.Module], shifts: Sequence[torch.Tensor], sign: float = 1.0) -> None:
    """Add (``sign=1``) or subtract (``sign=-1``) the shifts into the modules' weights, in their dtype."""
    for module, shift in zip(modules, shifts):
        view = weight_in_out(module)
        view.copy_(merged_weight(view, shift, sign))


@torch.no_grad()
def restore_entries(original: torch.Tensor, merged: torch.Tensor,
                    shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where subtracting ``shift`` from ``merged`` does not give ``original`` back bit for bit (rounding), the
    flat (d_in x d_out) indices and the original values: what an exact revert needs beside the shift."""
    wrong = (merged_weight(merged, shift, -1.0) != original).reshape(-1).nonzero().squeeze(1)
    return wrong, original.reshape(-1)[wrong].clone()


@torch.no_grad()
def revert_exactly(modules: Sequence[nn.Module], shifts: Sequence[torch.Tensor],
                   restores: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Subtract the shifts and put back the entries that rounding would leave off (:func:`restore_entries`)."""
    merge(modules, shifts, sign=-1.0)
    for module, (index, values) in zip(modules, restores):
        view = weight_in_out(module)
        view[index // view.shape[1], index % view.shape[1]] = values.to(view.dtype)


@torch.no_grad()
def output_energy(matrices: Sequence[torch.Tensor], moments: Sequence[torch.Tensor]) -> float:
    """``sum_l tr(X_l^T C_l X_l)``: the summed mean squared outputs of the (d_in, d_out) matrices ``X_l`` on keys whose
    second moments are ``C_l`` (fp32)."""
    total = 0.0
    for matrix, moment in zip(matrices, moments):
        matrix = matrix.to(torch.float32)
        total += float((matrix * (moment.to(matrix.device, torch.float32) @ matrix)).sum())
    return total


@torch.no_grad()
def relative_output_change(modules: Sequence[nn.Module], shifts: Sequence[torch.Tensor],
                           moments: Sequence[torch.Tensor], base: float | None = None) -> float:
    """How far the shifts move the modules' outputs on unrelated text against the outputs themselves:
    ``sum_l tr(dW_l^T C0_l dW_l) / sum_l tr(W_l^T C0_l W_l)``, with ``C0_l`` each module's second moment of its keys
    on unrelated text (the preservation term's matrix). 0 for no change; it is what the refinement's ``budget``
    bounds. ``base``: the denominator, where a caller measures many shifts against the same weights."""
    if base is None:
        base = output_energy([weight_in_out(module) for module in modules], moments)
    return output_energy(shifts, moments) / base
