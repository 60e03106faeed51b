"""Lifelong editing benchmark: every method of a sequential recipe side by side at several shapes T x n (T turns of
n requests, never restored, every request scored again on the final model).

    python benchmarks/lifelong.py --recipe configs/sequential/lifelong_benchmark_smollm2_counterfact.yaml \\
        --shapes 200x1 100x10 10x100 --max-requests 300 --out runs/lifelong_benchmark

Each shape is one ``edit.py sequential`` run of the recipe (its methods, each with its own ``method_settings``) with
``--limit T*n --turn-size n``, written to ``OUT/TxN/`` (report, result record, plots, TensorBoard logs); options this
script does not know go to those runs unchanged (``--method mose ft``, ``--requests``, ``--dev-size 1024``,
``--general-limit``). ``--max-requests M`` caps a shape at M requests (fewer turns, same turn size: the record
names the shape planned and the shape run). A shape whose folder is already complete is read, not run again, so the
shapes can run in separate sessions; then every shape is gathered into ``OUT/NAME.json`` and ``OUT/NAME.png``
(after-post efficacy, or ES, and QA and perplexity retention against edits done, one row per shape).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import provenance, pyplot, save_figure, write_json  # noqa: E402

from horse_pl.arguments import positive_int  # noqa: E402

SCORES = ("efficacy", "paraphrase", "neighborhood", "ES", "GS", "LS", "LS_agree")


def parse_shape(text: str) -> tuple[int, int]:
    """``'100x10'`` -> (100 turns, 10 requests per turn)."""
    turns, sep, size = text.lower().partition("x")
    if not (sep and turns.isdigit() and size.isdigit() and int(turns) > 0 and int(size) > 0):
        raise SystemExit(f"error: --shapes takes TURNSxREQUESTS_PER_TURN such as 100x10, not '{text}'.")
    return int(turns), int(size)


def run_shape(recipe: str, turns: int, size: int, folder: Path, passthrough: list[str]) -> None:
    """One ``edit.py sequential`` run of ``recipe`` at ``turns`` x ``size``, into ``folder`` (written whole or not at
    all); the curve is scored about four times along the way, at whole turns."""
    import edit

    n = turns * size
    curve_every = max(size, -(-n // 4 // size) * size)
    argv = ["sequential", "--config", recipe, "--limit", str(n), "--turn-size", str(size),
            "--curve-every", str(curve_every), "--diag-every", str(curve_every), "--out", str(folder),
            "--record-name", "record", *passthrough]
    if edit.main(argv) != 0:
        raise SystemExit(f"error: the {turns}x{size} run failed (see above); nothing was written to {folder}.")


def shape_summary(record: dict) -> dict:
    """What the benchmark keeps of one shape's result record, per method: the scores after the last turn and at
    every curve point, retention, the edited matrices' mean condition number relative to the unedited ones,
    and seconds per edit."""
    methods = {}
    for method, res in record["methods"].items():
        curve = res.get("stability_curve", [])
        first, last = (curve[0], curve[-1]) if curve else ({}, {})
        methods[method] = {
            "after_post": res["after_post"], "post": res["post"], "retention": res.get("retention"),
            "condition_number_ratio": (last["condition_number"] / first["condition_number"]
                                       if "condition_number" in first else None),
            "drift": last.get("drift"), "seconds_per_edit": res["seconds_per_edit"],
            "sequence_seconds": res["sequence_seconds"], "method_seconds": res.get("method_seconds"),
            "curve": res.get("curve", [])}
    return {"unedited": record["unedited"], "general_before": record.get("general_before"),
            "seconds": record.get("seconds"),  # the shape's whole run (absent in records before it was kept)
            "config": {k: record["config"][k] for k in ("methods", "turn_size", "method_settings", "editor",
                                                         "edit_modules") if k in record["config"]},
            "command": record["command"], "methods": methods}


def plot(report: dict, path: Path) -> None:
    from horse_pl.sequential.runner import curve_panels

    plt = pyplot()
    shapes = report["shapes"]
    first = next(iter(shapes.values()))
    score = "efficacy" if "efficacy" in first["unedited"] else "ES"
    panels = ((score, f"after-post {score}", "after_post"), ("open_domain_qa", "QA retention", "retention"),
              ("perplexity", "perplexity retention", "retention"))
    fig, axes = plt.subplots(len(shapes), len(panels), figsize=(4.2 * len(panels), 3.0 * len(shapes)), squeeze=False)
    for row, (shape, summary) in zip(axes, shapes.items()):
        curve_panels(row, summary, panels, prefix=f"{shape}: ")
        row[0].legend(fontsize=7)
    save_figure(fig, path, f"Lifelong editing benchmark: {report['recipe']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True,
                   help="sequential recipe (configs/sequential/) with the methods to compare")
    p.add_argument("--shapes", nargs="+", default=["200x1", "100x10", "10x100"],
                   help="TURNSxREQUESTS_PER_TURN, each one run (default 200x1 100x10 10x100)")
    p.add_argument("--max-requests", type=positive_int, default=None,
                   help="cap each shape at this many requests: fewer turns of the same size (default: no cap)")
    p.add_argument("--out", required=True, help="folder: one sub-folder per shape, and NAME.json / NAME.png")
    p.add_argument("--name", default="lifelong_benchmark", help="name of the gathered JSON and plot")
    args, passthrough = p.parse_known_args(argv)
    if not Path(args.recipe).is_file():
        raise SystemExit(f"error: --recipe '{args.recipe}' is not a file; pass a recipe from configs/sequential/.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for text in args.shapes:
        turns, size = parse_shape(text)
        planned = turns
        if args.max_requests is not None and turns * size > args.max_requests:
            turns = max(1, args.max_requests // size)
        name = f"{turns}x{size}"
        folder = out / name
        if not (folder / "record.json").exists():
            if folder.exists():
                raise SystemExit(f"error: {folder} exists but holds no finished run (no record.json); remove it to "
                                 "run that shape again.")
            run_shape(args.recipe, turns, size, folder, passthrough)
        else:
            print(f"{name}: reading the finished run in {folder}")
        record = json.loads((folder / "record.json").read_text())
        if record["config"]["turn_size"] != size or not record["protocol"].startswith(f"{turns * size} requests"):
            raise SystemExit(f"error: {folder} holds another shape's run ({record['protocol']}); remove it or choose "
                             "another --out.")
        shapes[name] = {"planned": f"{planned}x{size}", "turns": turns, "turn_size": size,
                        "n_requests": turns * size, **shape_summary(record)}
    report = {**provenance(), "kind": "lifelong_benchmark", "recipe": args.recipe,
              "max_requests": args.max_requests, "passthrough": passthrough, "shapes": shapes}
    path = write_json(report, out / f"{args.name}.json")
    plot(report, path.with_suffix(".png"))
    for name, summary in shapes.items():
        for method, res in summary["methods"].items():
            score = res["after_post"].get("efficacy", res["after_post"].get("ES"))
            kept = res["retention"] or {}
            qa, ppl = kept.get("open_domain_qa", float("nan")), kept.get("perplexity", float("nan"))
            print(f"{name:>8} {method:<16} after-post {score:.3f}  QA ret {qa:.3f}  ppl ret {ppl:.3f}  "
                  f"{res['seconds_per_edit']:.2f} s/edit")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
