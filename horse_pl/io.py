"""Atomic output folders: write into a temporary sibling, then rename, so a crash never leaves half a folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal


def write_atomic_dir(target: str | Path, write: Callable[[Path], None],
                     if_exists: Literal["error", "replace", "keep"] = "error") -> Path:
    """Call ``write(tmp_folder)`` and move the result to ``target``.

    ``if_exists``: ``error`` (never overwrite what a user has), ``replace`` (asked to overwrite) or
    ``keep`` (a cache another process filled first).
    """
    target = Path(target)
    if target.exists() and if_exists == "error":
        raise FileExistsError(f"'{target}' already exists; choose another output path or pass --overwrite.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():
            if if_exists == "keep":
                shutil.rmtree(tmp)
                return target
            # the old output is moved aside, not deleted, until the new one is in place: a crash in between
            # leaves one of them whole (the old one at its hidden name beside the target)
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
