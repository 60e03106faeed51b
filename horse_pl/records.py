"""Result records: what a run measured, written by the run itself as a small JSON file.

A record holds the recipe, the command, the commit, the machine, the date, every ``val/*`` / ``test/*``
metric and the step-time split. ``train.py`` runs write one through :class:`ResultsRecorder` (a
Lightning callback, enabled in the benchmark recipes); the benchmark scripts write theirs with
:func:`provenance` and :func:`write_record`. Records worth publishing are copied to ``docs/results/``,
from which ``python scripts/make_results.py`` generates ``docs/results.md`` and the README's table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L


def machine() -> str:
    """The processor, core count, GPU (if any) and torch version."""
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def commit() -> str | None:
    """The checked-out commit of the horse_pl repository (with ``+dirty`` if files changed), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def provenance(command: str | None = None) -> dict:
    """Who measured what where: command line, commit, machine and UTC time."""
    return {"command": command if command is not None else " ".join(["python"] + sys.argv),
            "commit": commit(), "machine": machine(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def write_record(record: dict, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``record`` as JSON atomically; an existing file is kept unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"Result record '{path}' already exists; choose another name or remove it first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


class ResultsRecorder(L.Callback):
    """Write a result record at the end of ``fit``, ``validate`` and ``test``.

    Args:
        dirpath: folder of the records (default: the trainer's ``default_root_dir``).
        name: record name (default: the logger's name, else ``run``); the file is
            ``{name}-{stage}-{UTC time}.json``, so no run overwrites another's record.
        recipe: the recipe the run was started from (for people reading the record).
    """

    def __init__(self, dirpath: str | None = None, name: str | None = None, recipe: str | None = None):
        self.dirpath, self.name, self.recipe = dirpath, name, recipe
        self.step_times: dict[str, list[float]] = {}
        self.started = time.perf_counter()
        self.path: Path | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for key, value in trainer.callback_metrics.items():
            if key.startswith("time/"):
                self.step_times.setdefault(key[len("time/"):], []).append(float(value))

    def _write(self, trainer, stage: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items())
                   if k.startswith(("val/", "test/"))}
        record = {"kind": stage, "name": self._name(trainer), "recipe": self.recipe, **provenance(),
                  "wall_seconds": time.perf_counter() - self.started, "global_step": trainer.global_step,
                  "metrics": metrics, "hyperparameters": _plain(dict(trainer.lightning_module.hparams)),
                  "data": _plain(dict(trainer.datamodule.hparams)) if trainer.datamodule is not None else {}}
        if stage == "fit" and self.step_times:
            record["step_seconds"] = {k: {"mean": statistics.fmean(v), "median": statistics.median(v), "n": len(v)}
                                      for k, v in self.step_times.items()}
        folder = Path(self.dirpath or trainer.default_root_dir)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.path = write_record(record, folder / f"{record['name']}-{stage}-{stamp}.json")
        print(f"result record: {self.path}")

    def _name(self, trainer) -> str:
        if self.name:
            return self.name
        logger = trainer.logger
        return getattr(logger, "name", None) or "run"

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, "fit")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, "test")


def _plain(value):
    """JSON-friendly copy of hyperparameters (stage objects and dicts from the CLI become strings/dicts)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    init_args = value.init_args() if hasattr(value, "init_args") else {}
    return {"class_path": f"{type(value).__module__}.{type(value).__qualname__}", "init_args": _plain(init_args)}
