"""One stage timer for training, validation, ``edit.py`` and the benchmarks, so a stage name means the same
everywhere: ``capture`` (forward + backward on the edit prompts), ``normalizer`` (training: fold the batch into
the hypernetwork's running statistics), ``predict`` (the hypernetwork), ``spread``, ``solve``, ``losses``
(training: the meta-losses with the shifts applied), ``backward`` (the hypernetwork's gradients), ``optimizer``,
``score_before`` / ``score_after`` (evaluation)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

TRAIN_STAGES = ("capture", "normalizer", "predict", "spread", "solve", "losses", "backward", "optimizer")


class StageTimer:
    """``with timer("solve"): ...`` adds the block's seconds to ``timer.seconds["solve"]``; on a CUDA device the
    block's queued work is waited for first, so the seconds are the stage's own. ``seconds`` may be a dict the
    caller keeps (``KnowledgeEditor.timings``)."""

    def __init__(self, device: torch.device | str | None = None, seconds: dict[str, float] | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds = {} if seconds is None else seconds

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())
