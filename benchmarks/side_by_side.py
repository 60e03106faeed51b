"""The training step beside the released code's, on one machine: its own loop and ours, interleaved, each alone.

    python benchmarks/side_by_side.py --released ../HORSE \\
        --released-args "data=zsre model=smollm2 editor=horse data.n_edits=128" \\
        --config configs/horse_smollm2_zsre_tuned.yaml --steps 4 --warmup 1 --rounds 2
    python benchmarks/side_by_side.py --released ../HORSE --released-args "..." -- --model.model_dtype bfloat16

``--released`` is a checkout of the released code (HORSE's, or MALMEN's, whose ``main.py`` it extends); nothing of
it is copied here. Each round runs, one after the other and never at once, the checkout's own ``main.py`` with
``--released-args`` (its Hydra overrides: set them to the recipe's settings) until its training progress bar
(tqdm, ``--released-progress``, default ``Train``) has counted ``--warmup + --steps`` steps, then stops it; and then
``benchmarks/train_step.py`` on ``--config`` (anything after ``--`` goes to the recipe) for as many steps. A
released step's time is the time between two counts of its bar, read as they are printed. The report gives each
side's steps per round, their medians and the ratio ours / released (per round and over all rounds), and the
checkout's commit where it is a git repository. Writes a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import provenance, split_at_dashes, write_json  # noqa: E402

from horse_pl.arguments import positive_int  # noqa: E402


def progress_counts(text: str, desc: str) -> list[int]:
    """The step counts, in order, of every update of the tqdm bar called ``desc`` in ``text`` (updates end in
    carriage returns or newlines)."""
    pattern = re.compile(rf"{re.escape(desc)}:\s*\d+%\|[^|]*\|\s*(\d+)/(?:\d+|\?)")
    return [int(m.group(1)) for m in pattern.finditer(text)]


def step_seconds(seen: dict[int, float], n: int) -> list[float]:
    """The seconds of steps 1..n from the times their counts were first printed (``seen``, count -> time, with 0);
    where the bar skipped counts, the steps between two printed counts share the time between them evenly."""
    counts = sorted(seen)
    steps = []
    for a, b in zip(counts, counts[1:]):
        steps += [(seen[b] - seen[a]) / (b - a)] * (b - a)
    return steps[:n]


def released_steps(checkout: Path, script: str, args: list[str], desc: str, n: int, timeout: float,
                   python: str = sys.executable) -> list[float]:
    """Run the checkout's ``script`` with ``args`` (under ``python``) until its ``desc`` bar has counted ``n``
    steps, stop it, and return the seconds of each of those steps (the first starts when the bar first shows 0,
    or at the start of the run if it never showed 0)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([python, script, *args], cwd=checkout, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, float] = {}  # count -> when it was first printed
    buffer, tail, start = "", "", time.monotonic()
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while max(seen, default=-1) < n:
            if time.monotonic() - start > timeout:
                raise SystemExit(f"The released code counted {max(seen, default=0)} of {n} steps in {timeout:.0f} s; "
                                 "raise --timeout or check --released-args.\n" + tail[-3000:])
            if not selector.select(timeout=1.0):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            now = time.monotonic()
            if not chunk:
                proc.wait()
                raise SystemExit(f"The released code ({checkout / script}) exited with code {proc.returncode} after "
                                 f"{max(seen, default=0)} of {n} steps of its '{desc}' bar; its last output:\n"
                                 + tail[-3000:])
            text = chunk.decode(errors="replace")
            tail = (tail + text)[-6000:]
            buffer += text
            done = max(buffer.rfind("\r"), buffer.rfind("\n"))
            if done < 0:
                continue
            for count in progress_counts(buffer[:done + 1], desc):
                seen.setdefault(count, now)
            buffer = buffer[done + 1:]
    finally:
        selector.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seen.setdefault(0, start)
    return step_seconds(seen, n)


def our_steps(config: str, steps: int, warmup: int, extra: list[str]) -> dict:
    """``benchmarks/train_step.py``'s report for ``steps`` timed steps after ``warmup`` (in its own process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train_step.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--config", config, "--steps", str(steps),
               "--warmup", str(warmup), "--out", str(out), *(["--", *extra] if extra else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"benchmarks/train_step.py failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def checkout_commit(checkout: Path) -> str | None:
    proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command, argv, extra = split_at_dashes(argv, "side_by_side.py")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--released", required=True, help="a checkout of the released code (a folder with main.py)")
    parser.add_argument("--released-script", default="main.py", help="its training entry point, in the checkout")
    parser.add_argument("--released-args", default="", help="its command-line arguments (Hydra overrides), one string")
    parser.add_argument("--released-progress", default="Train", help="the name of its training progress bar")
    parser.add_argument("--released-python", default=sys.executable,
                        help="the Python that runs it (default: this one; give its own environment's if it has one)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "horse_smollm2_zsre.yaml"), help="our recipe")
    parser.add_argument("--steps", type=positive_int, default=4, help="timed steps of each side per round")
    parser.add_argument("--warmup", type=positive_int, default=1, help="untimed first steps of each run")
    parser.add_argument("--rounds", type=positive_int, default=2, help="released then ours, this many times")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one released run may take")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "side_by_side.json"))
    args = parser.parse_args(argv)
    checkout = Path(args.released).resolve()
    if not (checkout / args.released_script).is_file():
        parser.error(f"--released '{args.released}' has no {args.released_script}; point it at a checkout of the "
                     "released code (or name its entry point with --released-script).")
    if not Path(args.config).is_file():
        parser.error(f"--config '{args.config}' is not a file; give one of the recipes in configs/.")
    rounds = []
    for r in range(args.rounds):
        timed = released_steps(checkout, args.released_script, shlex.split(args.released_args),
                               args.released_progress, args.warmup + args.steps, args.timeout,
                               args.released_python)[args.warmup:]
        ours = our_steps(args.config, args.steps, args.warmup, extra)
        rounds.append({"released_steps": timed, "our_steps": ours["steps"],
                       "released_median": statistics.median(timed), "our_median": ours["seconds"]["step"]["median"],
                       "our_split": {k: v["median"] for k, v in ours["seconds"].items()}})
        rounds[-1]["ratio"] = rounds[-1]["our_median"] / rounds[-1]["released_median"]
        print(f"round {r + 1}: released {rounds[-1]['released_median']:.2f} s, ours {rounds[-1]['our_median']:.2f} s "
              f"per step (median of {args.steps}), ratio {rounds[-1]['ratio']:.2f}", flush=True)
    released = statistics.median(s for row in rounds for s in row["released_steps"])
    ours_median = statistics.median(s for row in rounds for s in row["our_steps"])
    report = {**provenance(command), "kind": "side_by_side", "config": args.config, "recipe_overrides": extra,
              "released": {"checkout": str(checkout), "commit": checkout_commit(checkout),
                           "command": shlex.join([args.released_script, *shlex.split(args.released_args)])},
              "steps": args.steps, "warmup": args.warmup, "rounds": rounds,
              "released_median": released, "our_median": ours_median, "ratio": ours_median / released}
    write_json(report, args.out)
    print(f"released {released:.2f} s, ours {ours_median:.2f} s per step (median over {args.rounds} rounds): "
          f"ratio {report['ratio']:.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
