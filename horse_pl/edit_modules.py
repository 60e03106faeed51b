"""Find the modules to edit and view their weights in (d_in, d_out) orientation.

``edit_modules`` is either a list of full module names or a short spec:
``"last:6"`` (the last six MLP output projections), ``"layers:24-29"`` or ``"layers:3,5"``.
The MLP output projection is found per architecture: LLaMA/Mistral/Qwen/Gemma ``mlp.down_proj``,
GPT-2 ``mlp.c_proj`` (a ``Conv1D``), GPT-J ``mlp.fc_out``, GPT-NeoX ``mlp.dense_4h_to_h``.
:func:`forward_replaced` swaps a module's forward for the length of a block (shifts, trimmed passes).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

MLP_OUT_SUFFIXES = ("mlp.down_proj", "mlp.c_proj", "mlp.fc_out", "mlp.dense_4h_to_h")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def mlp_output_modules(model: nn.Module) -> list[str]:
    """Names of every layer's MLP output projection, in layer order."""
    names = [n for n, _ in model.named_modules() if n.endswith(MLP_OUT_SUFFIXES)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no MLP output projection named like {MLP_OUT_SUFFIXES}; "
            "pass explicit module names in edit_modules."
        )
    return sorted(names, key=layer_index)


def layer_index(name: str) -> int:
    """The transformer layer number in a module name such as ``model.layers.24.mlp.down_proj``."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"Module name '{name}' carries no layer number.")
    return int(match.group(1))


def resolve_edit_modules(model: nn.Module, edit_modules: str | Sequence[str]) -> list[str]:
    """Turn a spec (``"last:6"``, ``"layers:24-29"``, ``"layers:3,5"``) or explicit names into module names."""
    if isinstance(edit_modules, str):
        spec = edit_modules.replace(" ", "")
        candidates = mlp_output_modules(model)
        if match := re.fullmatch(r"last:(\d+)", spec):
            count = int(match.group(1))
            if not 1 <= count <= len(candidates):
                raise ValueError(f"edit_modules '{edit_modules}': the model has {len(candidates)} layers.")
            return candidates[-count:]
        if match := re.fullmatch(r"layers:(\d+)-(\d+)", spec):
            wanted = list(range(int(match.group(1)), int(match.group(2)) + 1))
        elif match := re.fullmatch(r"layers:(\d+(?:,\d+)*)", spec):
            wanted = [int(i) for i in match.group(1).split(",")]
        else:
            raise ValueError(
                f"edit_modules '{edit_modules}' is not understood: use 'last:N', 'layers:A-B', 'layers:A,B' "
                "or a list of module names."
            )
        by_layer = {layer_index(n): n for n in candidates}
        missing = [i for i in wanted if i not in by_layer]
        if missing:
            raise ValueError(f"edit_modules '{edit_modules}': layers {missing} do not exist (0..{max(by_layer)}).")
        return [by_layer[i] for i in wanted]
    names = list(edit_modules)
    known = dict(model.named_modules())
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(f"Edit module '{name}' is not in {type(model).__name__}.{hint}")
        if not hasattr(known[name], "weight") or known[name].weight.dim() != 2:
            raise ValueError(f"Edit module '{name}' has no 2-D weight; pick a Linear or Conv1D module.")
    if len(set(names)) != len(names):
        raise ValueError(f"edit_modules lists a module twice: {names}.")
    return names


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as (d_in, d_out); ``nn.Linear`` as (d_out, d_in)."""
    return type(module).__name__ == "Conv1D"


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """The module's weight shape in (d_in, d_out) orientation."""
    rows, cols = module.weight.shape
    return (rows, cols) if is_conv1d(module) else (cols, rows)


def weight_in_out(module: nn.Module) -> torch.Tensor:
    """A (d_in, d_out) view of the module's weight (no copy)."""
    return module.weight if is_conv1d(module) else module.weight.T


def get_modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The modules with these names, in the same order."""
    known = dict(model.named_modules())
    return [known[n] for n in names]


@contextmanager
def forward_replaced(module: nn.Module, forward: Callable):
    """Inside the block, ``module`` runs ``forward`` (hooks still fire); its previous forward comes back after."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
