"""Capture keys (module inputs) and value gradients (d loss / d module output) of every edit module.

One forward and one backward per micro-batch (per trimmed row group of it, see
:func:`horse_pl.lm.rows.row_groups`; the loss is still the micro-batch's mean) serve all edit
modules. The LM's weights need no gradient: each edit module's output is made a leaf that requires
grad, so the backward pass stops at the lowest edit module instead of running through the whole network.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from horse_pl.data.tokenize import IGNORE_INDEX
from horse_pl.lm.passes import group_answer_ce_sum
from horse_pl.lm.rows import row_groups
from horse_pl.progress import track


@dataclass
class Capture:
    """Per edit module, ``keys`` (N x d_in) and ``value_grads`` (N x d_out); rows line up across modules."""

    keys: list[torch.Tensor]
    value_grads: list[torch.Tensor]
    loss: float

    @property
    def n_rows(self) -> int:
        return self.keys[0].shape[0]


POSITIONS = ("answer", "all", "subject")


def record_mask(group: dict[str, torch.Tensor], positions: str) -> torch.Tensor:
    """Where :func:`capture` records keys in a micro-batch (or row group): answer tokens, the subject's last token,
    or every non-padding token."""
    if positions == "answer":
        return group["labels"] != IGNORE_INDEX
    if positions == "subject":
        return group["key_mask"]
    return group["attention_mask"].bool()


def _check_subject_positions(micro_batch: dict[str, torch.Tensor]) -> None:
    found = micro_batch["key_mask"].sum(1) if "key_mask" in micro_batch else torch.zeros(len(micro_batch["labels"]))
    missing = int((found != 1).sum())
    if missing:
        raise ValueError(f"This editor captures keys at the subject's last token (positions='subject'), but {missing} "
                         f"of {len(found)} edit prompts in a micro-batch have no subject in them; give every request "
                         "a 'subject' that appears in its prompt.")


@contextmanager
def _recording(modules: Sequence[nn.Module], mask: torch.Tensor, dtype: torch.dtype, keys: list, grads: list):
    handles = []

    def rows(x: torch.Tensor) -> torch.Tensor:
        # the last layer's MLP may already run on the masked rows alone (horse_pl.lm.last_mlp)
        return x[mask] if x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])

    def make_hook(i: int):
        def hook(module, inputs, output):
            keys[i].append(rows(inputs[0]).detach().to(dtype))
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            output.register_hook(lambda g: grads[i].append(rows(g).detach().to(dtype)))
            return output
        return hook

    try:
        handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
        yield
    finally:
        for h in handles:
            h.remove()


def capture(
    model: nn.Module,
    modules: Sequence[nn.Module],
    micro_batches: Sequence[dict[str, torch.Tensor]],
    positions: str = "answer",
    dtype: torch.dtype = torch.float32,
    full_rows: int = 0,
) -> Capture:
    """Forward + backward the model on ``micro_batches`` (loss: mean CE over answer tokens) and record
    keys and value gradients at the answer positions (``positions="answer"``, MALMEN/HORSE), at every
    non-padding position (``"all"``, MEND) or at the subject's last prompt token (``"subject"``, MEMIT's key:
    one row per request, the micro-batches' ``key_mask``).

    The mean makes a token's value gradient shrink with the number of answer tokens beside it in its
    micro-batch. With ``full_rows`` (the rows of a training micro-batch, :attr:`Editor.micro_batch_rows`)
    a micro-batch of another size counts as that many rows' worth of tokens (``n_answer x full_rows /
    rows``), so one request edited alone gets the gradient scale the editor was trained on; micro-batches
    of ``full_rows`` rows are unchanged."""
    if positions not in POSITIONS:
        raise ValueError(f"capture positions must be one of {list(POSITIONS)}, not '{positions}'.")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Capturing value gradients needs autograd, which torch.inference_mode disables; "
                           "run editing outside inference mode (for a Lightning Trainer: inference_mode=False).")
    keys: list[list[torch.Tensor]] = [[] for _ in modules]
    grads: list[list[torch.Tensor]] = [[] for _ in modules]
    total = 0.0
    for mb in track(micro_batches, "capture"):
        n_answer = int((mb["labels"] != IGNORE_INDEX).sum())
        rows = mb["labels"].shape[0]
        if full_rows and rows != full_rows:
            n_answer = n_answer * full_rows / rows
        loss = 0.0
        # the micro-batch's mean CE, computed one trimmed row group at a time (rows stay in order)
        if positions == "subject":
            _check_subject_positions(mb)
        for group in row_groups(mb):
            mask = record_mask(group, positions)
            with torch.enable_grad(), _recording(modules, mask, dtype, keys, grads):
                # MEND and subject keys record outside the answer, so the last MLP must run everywhere; the hooks
                # record by the group's full mask, so a shared prefix is not split off here
                group_loss = group_answer_ce_sum(model, group, trim_last_mlp=positions == "answer",
                                                 share_prefix=False) / n_answer
                group_loss.backward()
            loss += float(group_loss.detach())
        total += loss
    # Backward hooks fire from the last layer down; value_grads were appended per micro-batch all the same.
    return Capture(keys=[torch.cat(k) for k in keys], value_grads=[torch.cat(g) for g in grads],
                   loss=total / max(1, len(micro_batches)))
