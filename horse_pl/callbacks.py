"""Training callbacks the module always adds (:meth:`horse_pl.module.EditorModule.configure_callbacks`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SaveLastOnSigterm(Callback):
    """On SIGTERM (a scheduler's pre-emption), save ``last.ckpt`` after the running step, so the run resumes where
    it stopped (``--ckpt_path .../last.ckpt``) instead of at the last periodic checkpoint.

    Lightning notices the signal, lets the running step finish and then stops; this callback writes the checkpoint
    at the end of that step, where the periodic ones are written, atomically (a temporary file renamed over the old
    ``last.ckpt``). The path is the one a ``ModelCheckpoint(save_last=True)`` of the run writes, else
    ``{default_root_dir}/checkpoints/last.ckpt``.
    """

    def __init__(self):
        self.saved_step = -1

    @staticmethod
    def last_path(trainer: Trainer) -> Path:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"

    def _save(self, trainer: Trainer) -> None:
        path = self.last_path(trainer)
        tmp = path.with_name(f".{path.name}-{os.getpid()}.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)
            print(f"received SIGTERM: saved {path} at step {trainer.global_step}; resume with "
                  f"--ckpt_path {path}", file=sys.stderr, flush=True)
        trainer.strategy.barrier("sigterm_checkpoint")
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args, **kwargs) -> None:
        if getattr(trainer, "received_sigterm", False) and self.saved_step != trainer.global_step:
            self._save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if isinstance(exception, SIGTERMException) and fitting and self.saved_step != trainer.global_step:
            self._save(trainer)  # the signal came after the step's end (e.g. during validation)


class StepProgressBar(RichProgressBar):
    """Lightning's rich progress bar, counting a step-limited run's steps and edits instead of ``Epoch 0/-2``: one
    bar from the first to the last step across epochs, ``step 31/93, 3,968 edits``."""

    def _limited(self) -> bool:
        return self._trainer is not None and self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self):
        return self.trainer.max_steps if self._limited() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._limited():
            return super()._get_train_description(current_epoch)
        n_edits = getattr(getattr(self.trainer.datamodule, "hparams", None), "n_edits", None)
        step = self.trainer.global_step
        edits = f", {step * n_edits:,} edits" if n_edits else ""
        return f"step {step}/{self.trainer.max_steps}{edits}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_step(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_step(trainer)

    def _show_step(self, trainer) -> None:
        if self._limited() and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step,
                                 total=trainer.max_steps, description=self._get_train_description(0))
            self.refresh()
