"""What every recipe's run has, named after the recipe, so a recipe file holds only what makes it that recipe.

A ``train.py`` run started from ``--config configs/NAME.yaml`` gets, unless the command or the recipe sets them:

- ``trainer.default_root_dir``: ``checkpoints/NAME``;
- ``trainer.logger``: TensorBoard under ``lightning_logs/NAME``;
- ``trainer.callbacks``: a :class:`horse_pl.records.ResultsRecorder` (the run's JSON result record), the best
  checkpoint by ``val/ES`` (``best-{step}.ckpt``) and ``last.ckpt`` every ``recipe.save_every`` training steps,
  both in ``default_root_dir``.

The recipe's ``recipe:`` block (:class:`RunPieces`) sets the name and the saving interval; ``--trainer.logger
false`` or ``--trainer.enable_checkpointing false`` turn the logger or the checkpoints off as in plain
LightningCLI, and ``--recipe.record false`` the record. The filled-in entries are part of the parsed config, so the
``config.yaml`` Lightning saves beside the logs is complete, and rerunning it adds nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jsonargparse import Namespace

ROOT = Path(__file__).resolve().parents[1]
RECORDER = "horse_pl.records.ResultsRecorder"
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"
LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


@dataclass
class RunPieces:
    """The run's name and saving interval; folders, logger, record and checkpoints follow from them."""

    name: str | None = None
    """The run's name: ``checkpoints/NAME``, ``lightning_logs/NAME`` and the record's name (default: the last
    ``--config`` file's name without ``.yaml``; with neither, a plain LightningCLI run)."""
    save_every: int | None = None
    """Write ``last.ckpt`` every this many training steps (default: at the end of each epoch and of validation)."""
    record: bool = True
    """Write the run's JSON result record (:class:`horse_pl.records.ResultsRecorder`)."""


def recipe_path(config_files) -> str | None:
    """The last ``--config`` file as a person would name it: relative to the working folder or the repository."""
    if not config_files:
        return None
    path = Path(str(config_files[-1])).resolve()
    for base in (Path.cwd(), ROOT):
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return str(path)


def _piece(class_path: str, **init_args) -> Namespace:
    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def _has(callbacks: list, class_path: str, **init_args) -> bool:
    """Whether ``callbacks`` (parsed, not yet instantiated) already holds this piece."""
    for cb in callbacks:
        if isinstance(cb, Namespace) and cb.get("class_path") == class_path:
            args = cb.get("init_args") or Namespace()
            if all(args.get(k) == v for k, v in init_args.items()):
                return True
    return False


def fill_run_pieces(config: Namespace) -> None:
    """Fill ``config.trainer``'s name-bearing entries from ``config.recipe`` and the ``--config`` files (in place)."""
    pieces = config.get("recipe") or Namespace()
    recipe = recipe_path(config.get("config"))
    name = pieces.get("name") or (Path(recipe).stem if recipe else None)
    if name is None:
        return
    config.recipe = Namespace(name=name, save_every=pieces.get("save_every"), record=pieces.get("record", True))
    trainer = config.trainer
    if trainer.get("default_root_dir") is None:
        trainer.default_root_dir = f"checkpoints/{name}"
    if trainer.get("logger") in (None, True):
        trainer.logger = _piece(LOGGER, save_dir="lightning_logs", name=name)
    callbacks = list(trainer.get("callbacks") or [])
    if config.recipe.record and not _has(callbacks, RECORDER):
        callbacks.append(_piece(RECORDER, recipe=recipe, name=name))
    if trainer.get("enable_checkpointing") is not False:
        dirpath = str(trainer.default_root_dir)
        if not _has(callbacks, CHECKPOINT, monitor="val/ES"):
            callbacks.append(_piece(CHECKPOINT, dirpath=dirpath, save_last=False, monitor="val/ES", mode="max",
                                    save_top_k=1, filename="best-{step}"))
        if not _has(callbacks, CHECKPOINT, save_last=True):
            callbacks.append(_piece(CHECKPOINT, dirpath=dirpath, save_last=True,
                                    every_n_train_steps=config.recipe.save_every))
    trainer.callbacks = callbacks
