"""What both benchmark scripts share: the machine description and atomic JSON output."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from horse_pl.records import machine, provenance  # noqa: F401  (re-exported for the benchmark scripts)


def split_at_dashes(argv: list[str], script: str) -> tuple[str, list[str], list[str]]:
    """``(command, own, passed_on)``: the command line as a record names it (``python benchmarks/SCRIPT ...``),
    the script's own arguments, and those after ``--``, which it passes on to what it runs."""
    command = f"python benchmarks/{script} " + shlex.join(argv)
    if "--" not in argv:
        return command, list(argv), []
    cut = argv.index("--")
    return command, argv[:cut], argv[cut + 1:]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, title: str) -> None:
    """Title, lay out and write a figure, then free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: dict, out: str | Path) -> Path:
    """Write ``report`` to ``out`` atomically (temporary file, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    return out
