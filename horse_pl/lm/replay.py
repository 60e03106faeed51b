"""Frozen lower layers, computed once: replay of the decoder layers below the lowest trained one.

An optimiser that trains only modules from decoder layer ``first`` up (FT-L and MOSE on a few late MLP projections)
runs the same prompts step after step, and the layers below ``first`` give the same output every time. Inside
:func:`replayed_below` the first pass over an input records the output of layer ``first - 1``; a later pass over
the same input skips the layers below ``first`` (each returns its input) and takes the recorded output instead, so
the results are bit for bit those of the full passes. A pass that reads or builds a key-value cache always runs in
full (the skipped layers would leave their part of the cache empty); inside the block the answer passes do not split
off a shared prefix (:mod:`horse_pl.lm.passes`), so their row groups replay whole.

Editing uses it the same way (:func:`horse_pl.editing.evaluate.edit_and_score`): the shifts change only the edit
modules' layers, so the capture pass and the unedited scoring passes record what the refinement steps and the
edited scoring passes replay.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from horse_pl.edit_modules import forward_replaced

_ACTIVE = "_horse_pl_replaying"  # the lowest replayed-from layer, set on a model while a replay block is open


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers of a causal LM whose base model keeps them as ``layers`` (LLaMA, Qwen, Gemma...), or None."""
    layers = getattr(model.base_model, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def replaying(model: nn.Module) -> bool:
    """Whether ``model`` is inside a :func:`replayed_below` block that replays."""
    return bool(getattr(model, _ACTIVE, 0))


def lowest_layer(model: nn.Module, modules: Sequence[nn.Module]) -> int:
    """The lowest decoder layer holding one of ``modules``; 0 (nothing to replay) where one of them lies outside
    every decoder layer or the model's layers are not found."""
    layers = decoder_layers(model)
    if layers is None or not modules:
        return 0
    owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    found = [owner.get(id(m)) for m in modules]
    return 0 if None in found else min(found)


@contextmanager
def replayed_below(model: nn.Module, first: int, max_bytes: int | None = None) -> Iterator[None]:
    """Inside the block, passes over an input already seen replay the output of the layers below ``first`` (see
    the module's text). No effect where ``first`` is 0 or the model's layers are not found. Inside another block
    the outer one serves, which is right only if it replays no layer the inner one changes: an inner ``first``
    below the outer one's is refused. ``max_bytes`` caps the recorded outputs; inputs past the cap run in full."""
    layers = decoder_layers(model)
    recorded: dict[tuple, torch.Tensor] = {}
    outer = getattr(model, _ACTIVE, 0)
    if outer and first < outer:
        raise RuntimeError(f"A replay of the layers below {outer} is open, but this block changes layer {first} or "
                           "lower, which it would replay; close the outer replay first.")
    if not first or layers is None or first > len(layers) or outer:
        yield
        return
    stored = [0]
    now: dict[str, tuple | None] = {"key": None}

    def note_input(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cached = kwargs.get("past_key_values") is not None or kwargs.get("use_cache")
        mask = kwargs.get("attention_mask")
        now["key"] = None if ids is None or cached else (
            tuple(ids.shape), ids.cpu().numpy().tobytes(), None if mask is None else mask.cpu().numpy().tobytes())

    def skipped(full):
        def forward(hidden_states, *args, **kwargs):
            return hidden_states if now["key"] in recorded else full(hidden_states, *args, **kwargs)
        return forward

    top = layers[first - 1]
    top_full = top.forward

    def last_below(hidden_states, *args, **kwargs):
        key = now["key"]
        if key in recorded:
            return recorded[key]
        out = top_full(hidden_states, *args, **kwargs)
        size = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0
        if key is not None and size and (max_bytes is None or stored[0] + size <= max_bytes):
            recorded[key] = out.detach()
            stored[0] += size
        return out

    with ExitStack() as stack:
        setattr(model, _ACTIVE, first)
        stack.callback(delattr, model, _ACTIVE)
        stack.callback(model.base_model.register_forward_pre_hook(note_input, with_kwargs=True).remove)
        for layer in layers[:first - 1]:
            stack.enter_context(forward_replaced(layer, skipped(layer.forward)))
        stack.enter_context(forward_replaced(top, last_below))
        yield
