"""Edit one batch and score it before and after: shared by validation and edit.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from horse_pl.data.batch import EditBatch
from horse_pl.editing.editor import NO_BATCHES, Editor, EditState, Refinement, RefinementBatches
from horse_pl.editing.shifts import applied
from horse_pl.editing.spread import AllReduce
from horse_pl.lm import lowest_layer, replayed_below
from horse_pl.metrics import SequenceScores, compute_scores, score_batch
from horse_pl.reduction import LOCAL
from horse_pl.timing import StageTimer

REPLAY_BYTES = 2 * 2**30  # most bytes of lower-layer outputs an edit keeps for replay; later inputs run in full


@dataclass
class BatchResult:
    """Shifts of one edit batch with per-sequence scores before (optional) and after the edit."""

    state: EditState
    before: dict[str, SequenceScores] | None
    after: dict[str, SequenceScores]
    values_before: dict[str, torch.Tensor] | None
    values_after: dict[str, torch.Tensor]


def edit_and_score(editor: Editor, lm: nn.Module, modules: Sequence[nn.Module], batch: EditBatch,
                   views: Sequence[str], score_before: bool = True, all_reduce: AllReduce = LOCAL,
                   timer: StageTimer | None = None, rounds: int = 1,
                   refinement: Refinement | None = None,
                   refinement_batches: RefinementBatches = NO_BATCHES) -> BatchResult:
    """Compute the shifts of ``batch["edit"]`` (in ``rounds``, or refined by ``refinement``, which reads
    ``refinement_batches`` beside the edit prompts: :meth:`Editor.edit_in_rounds`), score ``views``
    unedited (or, without ``score_before``, only the locality view when it is among ``views``: LS_agree needs it)
    and with the shifts applied; no views, no scoring. The model is left unedited. ``timer`` receives the
    seconds of capture, predict, spread, solve, score_before and score_after.

    The decoder layers below the lowest edit module's run once per input: the capture pass and the unedited
    scoring record their output, and the refinement steps and the edited scoring replay it
    (:func:`horse_pl.lm.replayed_below`, up to :data:`REPLAY_BYTES`), so every result is bit for bit that of full
    passes."""
    timer = StageTimer(next(lm.parameters()).device) if timer is None else timer
    views = tuple(v for v in views if batch.get(v))
    with replayed_below(lm, lowest_layer(lm, modules), REPLAY_BYTES):
        state = editor.edit_in_rounds(lm, modules, batch["edit"].micro_batches, rounds, all_reduce, timer,
                                      refinement, refinement_batches)
        with timer("score_before"):
            if score_before:
                before = score_batch(lm, batch, views, "score before")
                locality_before = before.get("locality")
            else:
                before = None
                locality_before = (score_batch(lm, batch, ("locality",), "score before")["locality"]
                                   if "locality" in views else None)
        with timer("score_after"), applied(modules, state.param_shifts):
            after = score_batch(lm, batch, views, "score after")
    values_before = compute_scores(before, locality_before) if before is not None else None
    return BatchResult(state, before, after, values_before, compute_scores(after, locality_before))
