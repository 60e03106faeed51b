"""The last layer's MLP run at the answer positions alone.

Only the answer positions' final hidden states are read, so the last layer's MLP (a per-position map) runs at
those positions only; its output elsewhere is left at zero, which nothing downstream reads.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn

from horse_pl.edit_modules import forward_replaced, mlp_output_modules

_LAST_MLP_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its last MLP's name ("": none)


def last_mlp(model: nn.Module) -> nn.Module | None:
    """The last layer's MLP: the parent of its output projection (None if the model has no such module)."""
    name = _LAST_MLP_NAMES.get(model)
    if name is None:
        try:
            name = mlp_output_modules(model)[-1].rpartition(".")[0]
        except ValueError:
            name = ""
        _LAST_MLP_NAMES[model] = name
    return model.get_submodule(name) if name else None


@contextmanager
def last_mlp_rows(model: nn.Module, rows: torch.Tensor):
    """Inside the block, the last layer's MLP runs only at the positions where ``rows`` (batch x seq) is
    True and outputs zeros elsewhere. Its input reaches the MLP (and its output projection) as one
    sequence of those rows in row-major order, the order of ``hidden[rows]``."""
    mlp = last_mlp(model)
    if mlp is None:
        yield
        return
    full = mlp.forward

    def forward(hidden: torch.Tensor, *args, **kwargs):
        if hidden.shape[:-1] != rows.shape:
            return full(hidden, *args, **kwargs)
        out = full(hidden[rows].unsqueeze(0), *args, **kwargs)
        if not isinstance(out, torch.Tensor):  # an MLP returning extras (some MoE blocks): run it in full
            return full(hidden, *args, **kwargs)
        zeros = out.new_zeros(*rows.shape, out.shape[-1])
        return zeros.masked_scatter(rows.unsqueeze(-1), out)

    with forward_replaced(mlp, forward):
        yield
