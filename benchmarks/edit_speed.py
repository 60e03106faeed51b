"""Editing speed against the hardware floor, for N simultaneous edits.

    python benchmarks/edit_speed.py                       # N = 16, 64, 256, 1024 on the embedded SmolLM2
    python benchmarks/edit_speed.py --editor editors/quickstart --n 256

For each N, the wall time to compute and merge N edits, split into capture, hypernetwork prediction,
spread, solve and merge; edits per second; peak memory. Beside it the floor: one forward + backward
over the same N edit prompts with gradients only at the edit modules' weights, the work no
gradient-based editor can skip. Every measurement runs in its own process (so peak memory is its own);
time is the minimum over ``--repeats``. With ``--interleave`` one process per N times edit and floor in turn,
``--repeats`` times each, so a drift of the machine's speed reaches both alike (no peak memory then). Writes a JSON
file and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import machine, pyplot, save_figure, write_json  # noqa: E402

from horse_pl.arguments import positive_int  # noqa: E402
from horse_pl.records import commit  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "zsre" / "zsre_train_10k.json.gz"


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> dict:
    """One measurement (``edit`` or ``floor``) for one N, in this process."""
    import torch

    from horse_pl.data.batch import edit_batch
    from horse_pl.data.records import load_requests
    from horse_pl.edit_modules import get_modules, resolve_edit_modules, weight_shape
    from horse_pl.editing.editor import Editor
    from horse_pl.editing.shifts import merge
    from horse_pl.export import load_editor
    from horse_pl.lm import answer_ce
    from horse_pl.models import load_model, parse_dtype
    from horse_pl.timing import StageTimer

    torch.manual_seed(0)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    if args.editor:
        editor, config = load_editor(args.editor)
        names = config.edit_modules
    else:  # an untrained editor of the recipe's architecture costs exactly what a trained one does
        names = resolve_edit_modules(model, args.edit_modules)
        shapes = [weight_shape(m) for m in get_modules(model, names)]
        editor = Editor(shapes, rank=args.rank, n_blocks=2, lr=1e-4, chunk_size=args.chunk_size,
                        cache_dtype=parse_dtype(args.cache_dtype))
    editor = editor.to(device)
    modules = get_modules(model, names)
    requests, _ = load_requests(args.data, skip_invalid=True, limit=None)
    if len(requests) < args.worker_n:
        raise SystemExit(f"{args.data} has {len(requests)} valid requests, fewer than N={args.worker_n}.")
    requests = requests[:args.worker_n]
    micro_batches = edit_batch(tok, requests, ("edit",), args.batch_size).to(device)["edit"].micro_batches
    warm = micro_batches[:1]
    for param in model.parameters():
        param.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = _peak_mb(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_tokens = int(sum((mb["labels"] != -100).sum() for mb in micro_batches))
    weights = [m.weight for m in modules]

    def floor_once(batches) -> dict[str, float]:
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        timer = StageTimer(device)
        with timer("total"):
            for mb in batches:
                answer_ce(model, mb).backward()
        for w in weights:  # the capture needs no weight gradient
            w.requires_grad_(False)
            w.grad = None
        return timer.seconds

    def edit_once(batches) -> dict[str, float]:
        timer = StageTimer(device)
        timings = timer.seconds
        with timer("capture"):
            cap = editor.capture(model, modules, batches)
        with torch.no_grad():
            state = editor.param_shifts(cap, timer=timer)
            with timer("merge"):
                merge(modules, state.param_shifts)
                merge(modules, state.param_shifts, sign=-1.0)  # restore for the next repeat
            timings["merge"] /= 2  # one merge
        timings["total"] = sum(timings[k] for k in ("capture", "predict", "spread", "solve", "merge"))
        return timings

    # "both" times the two in turn in this one process (interleaved: a drift of the machine's speed reaches both)
    kinds = ("floor", "edit") if args.worker_kind == "both" else (args.worker_kind,)
    once = {"floor": floor_once, "edit": edit_once}
    for kind in kinds:  # warm-up on one micro-batch
        once[kind](warm)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for kind in kinds:
            result = once[kind](micro_batches)
            if kind not in best or result["total"] < best[kind]["total"]:
                best[kind] = result
    peak = _peak_mb(device)
    return {"kind": args.worker_kind, "n_edits": args.worker_n, "answer_tokens": n_tokens,
            "seconds": best if args.worker_kind == "both" else best[args.worker_kind],
            "peak_memory_mb": peak, "peak_over_loaded_mb": peak - base_mb}


def measure(args: argparse.Namespace, kind: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--worker-kind", kind, "--worker-n", str(n)] + args.passthrough
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode:
        raise SystemExit(f"benchmark worker ({kind}, N={n}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_slope(xs, ys, log: bool) -> float:
    """Least-squares slope of y on x (on log-log axes when ``log``: the growth exponent)."""
    if log:
        xs, ys = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot(report: dict, path: Path) -> None:
    rows = report["results"]
    ns = [r["n_edits"] for r in rows]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("total", "edit (capture+predict+spread+solve+merge)"), ("capture", "capture")):
        ax1.plot(ns, [r["edit"][key] for r in rows], marker="o", label=label)
    ax1.plot(ns, [r["floor"] for r in rows], marker="s", linestyle="--", label="floor (fwd+bwd, grads at edit modules)")
    ax1.set(xscale="log", yscale="log", xlabel="simultaneous edits N", ylabel="seconds")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3, which="both")
    if rows[0]["edit_peak_over_loaded_mb"] is None:  # interleaved: no peak memory of either alone
        ax2.plot(ns, [r["ratio"] for r in rows], marker="o", label="edit / floor")
        ax2.set(xscale="log", xlabel="simultaneous edits N", ylabel="edit / floor")
    else:
        ax2.plot(ns, [r["edit_peak_over_loaded_mb"] for r in rows], marker="o", label="edit")
        ax2.plot(ns, [r["floor_peak_over_loaded_mb"] for r in rows], marker="s", linestyle="--", label="floor")
        ax2.set(xscale="log", xlabel="simultaneous edits N", ylabel="peak memory over loaded model (MiB)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    save_figure(fig, path, f"{report['model']} ({report['dtype']}, {report['device']}), {report['machine']}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=positive_int, nargs="+", default=[16, 64, 256, 1024],
                   help="numbers of simultaneous edits")
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--editor", help="exported editor folder (default: an untrained editor of --rank/--edit-modules)")
    p.add_argument("--edit-modules", default="layers:24-29")
    p.add_argument("--rank", type=positive_int, default=1920)
    p.add_argument("--chunk-size", type=positive_int, default=1024)
    p.add_argument("--cache-dtype", default="float32")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="requests to edit (the first N valid ones)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="prompts per forward/backward micro-batch")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=positive_int, default=2, help="time = minimum over this many runs")
    p.add_argument("--interleave", action="store_true",
                   help="time edit and floor in turn in one process per N (no peak memory)")
    p.add_argument("--out", default="benchmarks/results/edit_speed.json")
    p.add_argument("--worker-kind", help=argparse.SUPPRESS)
    p.add_argument("--worker-n", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker_kind:
        print(json.dumps(worker(args)))
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    # everything but --n/--out goes to the workers
    args.passthrough, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = a in ("--n", "--out")
        if not skip:
            args.passthrough.append(a)

    results = []
    for n in args.n:
        if args.interleave:  # one process times both in turn; its peak memory is theirs together, so none is given
            both = measure(args, "both", n)
            edit_s, floor_s = both["seconds"]["edit"], both["seconds"]["floor"]
            memory = dict.fromkeys(("edit_peak_memory_mb", "edit_peak_over_loaded_mb", "floor_peak_memory_mb",
                                    "floor_peak_over_loaded_mb"))
        else:
            edit, floor = measure(args, "edit", n), measure(args, "floor", n)
            both, edit_s, floor_s = edit, edit["seconds"], floor["seconds"]
            memory = {"edit_peak_memory_mb": edit["peak_memory_mb"],
                      "edit_peak_over_loaded_mb": edit["peak_over_loaded_mb"],
                      "floor_peak_memory_mb": floor["peak_memory_mb"],
                      "floor_peak_over_loaded_mb": floor["peak_over_loaded_mb"]}
        row = {"n_edits": n, "answer_tokens": both["answer_tokens"], "edit": edit_s, "floor": floor_s["total"],
               "ratio": edit_s["total"] / floor_s["total"], "edits_per_second": n / edit_s["total"],
               "seconds_per_100_edits": 100 * edit_s["total"] / n, **memory}
        results.append(row)
        s = row["edit"]
        peak = ("" if args.interleave else f"  peak +{row['edit_peak_over_loaded_mb']:.0f} MiB "
                f"(floor +{row['floor_peak_over_loaded_mb']:.0f})")
        print(f"N={n:>5}  edit {s['total']:7.2f} s (capture {s['capture']:.2f}, predict {s['predict']:.2f}, "
              f"spread {s['spread']:.3f}, solve {s['solve']:.2f}, merge {s['merge']:.3f})  "
              f"floor {row['floor']:7.2f} s  ratio {row['ratio']:.2f}  {row['edits_per_second']:.1f} edits/s{peak}",
              flush=True)
    ns = [r["n_edits"] for r in results]
    report = {
        "kind": "edit_speed", "date": date.today().isoformat(), "model": args.model, "dtype": args.dtype,
        "device": args.device,
        "editor": args.editor or f"untrained, rank {args.rank}, {args.edit_modules}",
        "machine": machine(), "commit": commit(),
        "command": "python benchmarks/edit_speed.py " + " ".join(argv), "results": results,
    }
    if len(ns) > 1:
        report["time_growth_exponent"] = fit_slope(ns, [r["edit"]["total"] for r in results], log=True)
        report["floor_growth_exponent"] = fit_slope(ns, [r["floor"] for r in results], log=True)
        print(f"time ~ N^{report['time_growth_exponent']:.2f} (floor ~ N^{report['floor_growth_exponent']:.2f})")
        if not args.interleave:
            report["memory_mb_per_edit"] = fit_slope(ns, [r["edit_peak_over_loaded_mb"] for r in results], log=False)
            print(f"peak memory grows {report['memory_mb_per_edit']:.2f} MiB per edit")
    out = Path(args.out)
    write_json(report, out)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
