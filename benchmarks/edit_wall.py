"""``edit.py``'s whole run against its edit stages, for each scoring mode and number of requests.

    python benchmarks/edit_wall.py --editor editors/horse_smollm2_zsre_joint512_kl \\
        --requests ../shared/data/zsre/zsre_eval_1k.json.gz --n 256 1024 --score none edit all

Runs ``python edit.py edit --editor E --requests R --limit N --score S --progress off`` for each N and S, one
after the other (each alone, into a temporary folder), and reads the run's own timings (its report's, and the
printed wall time from reading the requests to the written output): the wall time beside the edit stages
(capture + predict + spread + solve + merge) and every other stage (load, tokenize, scoring before and after,
examples, save). Anything after ``--`` goes to ``edit.py``. Writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import provenance, split_at_dashes, write_json  # noqa: E402

from horse_pl.arguments import positive_int  # noqa: E402

EDIT_STAGES = ("capture", "predict", "spread", "solve", "merge")
SCORE_MODES = ("all", "edit", "none")


def timing_line(stdout: str) -> tuple[dict[str, float], float]:
    """The stage seconds and the wall time of ``edit.py``'s ``timings (s): ...; wall W ...`` line."""
    line = next((x for x in stdout.splitlines() if x.startswith("timings (s): ")), None)
    if line is None:
        raise ValueError("edit.py printed no 'timings (s):' line")
    stages, wall = line[len("timings (s): "):].split("; wall ")
    seconds = {name: float(value) for name, value in re.findall(r"(\w+) ([\d.]+)", stages)}
    return seconds, float(wall.split()[0])


def run_edit(editor: str, requests: str, n: int, score: str, extra: list[str]) -> dict:
    """One ``edit.py edit`` run (``extra``: more of its options) and its timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "edited"
        cmd = [sys.executable, str(ROOT / "edit.py"), "edit", "--editor", editor, "--requests", requests,
               "--limit", str(n), "--score", score, "--progress", "off", "--out", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"edit.py failed (N={n}, --score {score}):\n{proc.stderr[-3000:]}")
        printed, wall = timing_line(proc.stdout)
        # the report's figures are unrounded; the saving, timed after the report was written, only printed
        report = out.with_name(out.name + ".edit_report.json") if "--delta" in extra else out / "edit_report.json"
        seconds = {**printed, **json.loads(report.read_text())["timings"]}
    edit = sum(seconds.get(k, 0.0) for k in EDIT_STAGES)
    return {"n_edits": n, "score": score, "wall": wall, "edit_stages": edit, "ratio": wall / edit, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command, argv, extra = split_at_dashes(argv, "edit_wall.py")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--editor", required=True, help="an exported editor folder")
    parser.add_argument("--requests", required=True, help="the requests file (the first N are edited)")
    parser.add_argument("--n", type=positive_int, nargs="+", default=[256, 1024], help="numbers of requests")
    parser.add_argument("--score", nargs="+", choices=SCORE_MODES, default=list(SCORE_MODES), help="scoring modes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edit_wall.json"))
    args = parser.parse_args(argv)
    for path, option in ((args.editor, "--editor"), (args.requests, "--requests")):
        if not Path(path).exists():
            parser.error(f"{option} '{path}' does not exist.")
    rows = []
    for n in args.n:
        for score in args.score:
            row = run_edit(str(Path(args.editor).resolve()), str(Path(args.requests).resolve()), n, score, extra)
            rows.append(row)
            print(f"N={n:>5}  --score {score:<4}  wall {row['wall']:7.1f} s  edit stages {row['edit_stages']:6.1f} s  "
                  f"ratio {row['ratio']:.2f}  (" + ", ".join(f"{k} {v:.1f}" for k, v in row["seconds"].items()) + ")",
                  flush=True)
    report = {**provenance(command), "kind": "edit_wall", "editor": args.editor, "requests": args.requests,
              "edit_py_options": extra, "results": rows}
    write_json(report, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
