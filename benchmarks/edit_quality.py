"""Edit quality against the number of simultaneous edits, for editors that differ only in their spread.

    python benchmarks/edit_quality.py --dataset zsre                      # N = 16, 64, 256
    python benchmarks/edit_quality.py --dataset counterfact --n 16 64 256 1024

For each editor and each N, the first N requests of the evaluation file are edited at once with the
editor's own code path (capture, predict, spread, solve) and scored with the shifts applied: ES / GS /
LS, LS_agree, generation exact match, and where the data allows efficacy / paraphrase / neighbourhood
and portability. The unedited model's scores on the same requests come from the same pass. The
default editors are the exported recipes below (train each with the same budget, then export):

    gram_schmidt  editors/horse_smollm2_{dataset}            configs/horse_smollm2_{dataset}.yaml
    reference     editors/horse_reference_smollm2_{dataset}  configs/horse_reference_smollm2_{dataset}.yaml
    none          editors/malmen_smollm2_{dataset}           configs/malmen_smollm2_{dataset}.yaml

    python train.py fit --config configs/<recipe>.yaml
    python train.py export --ckpt_path checkpoints/<recipe>/last.ckpt --out editors/<recipe>

Editors that are missing are listed with these commands and skipped. Writes a JSON file and a PNG plot.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import machine, pyplot, save_figure, write_json  # noqa: E402

DATA = {"zsre": ROOT.parent / "shared" / "data" / "zsre" / "zsre_eval_1k.json.gz",
        "counterfact": ROOT.parent / "shared" / "data" / "counterfact" / "counterfact_eval_10k.json.gz"}
RECIPES = {"gram_schmidt": "horse_smollm2_{}", "reference": "horse_reference_smollm2_{}", "none": "malmen_smollm2_{}"}
SCORES = ("ES", "GS", "LS", "LS_agree", "EM_edit", "EM_rephrase", "efficacy", "paraphrase", "neighborhood",
          "portability")


def _editors(args) -> dict[str, Path]:
    if args.editors:
        pairs = [e.split("=", 1) for e in args.editors]
        bad = [e for e, p in zip(args.editors, pairs) if len(p) != 2]
        if bad:
            raise SystemExit(f"error: --editors takes NAME=FOLDER pairs, not {bad}.")
        return {name: Path(folder) for name, folder in pairs}
    found, missing = {}, []
    for name, recipe in RECIPES.items():
        folder = ROOT / "editors" / recipe.format(args.dataset)
        if (folder / "config.json").exists():
            found[name] = folder
        else:
            missing.append((name, recipe.format(args.dataset)))
    for name, recipe in missing:
        print(f"skipping '{name}': no editor in editors/{recipe}; make it with\n"
              f"  python train.py fit --config configs/{recipe}.yaml\n"
              f"  python train.py export --ckpt_path checkpoints/{recipe}/last.ckpt --out editors/{recipe}",
              file=sys.stderr)
    if not found:
        raise SystemExit("error: no editor to evaluate; train and export one with the commands above.")
    return found


def evaluate(args) -> dict:

    from horse_pl.api import KnowledgeEditor
    from horse_pl.data.datamodule import EVAL_VIEWS
    from horse_pl.data.records import load_requests
    from horse_pl.edit_modules import get_modules
    from horse_pl.editing.evaluate import edit_and_score
    from horse_pl.export import load_editor

    editors = _editors(args)
    requests, _ = load_requests(args.data or DATA[args.dataset], args.format, skip_invalid=True,
                                limit=max(args.n))
    if len(requests) < max(args.n):
        raise SystemExit(f"error: {args.data or DATA[args.dataset]} has {len(requests)} valid requests, fewer "
                         f"than N={max(args.n)}.")
    report = {"date": date.today().isoformat(), "dataset": args.dataset, "data": str(args.data or DATA[args.dataset]),
              "machine": machine(),
              "command": "python benchmarks/edit_quality.py " + " ".join(sys.argv[1:]), "unedited": {},
              "editors": {name: {"folder": str(folder)} for name, folder in editors.items()}}
    ke = None
    for position, (name, folder) in enumerate(editors.items()):
        if ke is None:
            ke = KnowledgeEditor.from_pretrained(folder, model=args.model, dtype=args.dtype, device=args.device)
        else:  # same base model: swap only the editor
            editor, config = load_editor(folder)
            if config.base_fingerprint != ke.config.base_fingerprint:
                raise SystemExit(f"error: the editor in {folder} was trained on another base model "
                                 f"('{config.base_model}') than the first editor; compare editors of one model.")
            ke.editor, ke.config = editor.to(args.device), config
            ke.modules = get_modules(ke.model, config.edit_modules)
        report["editors"][name]["config"] = {k: getattr(ke.config, k) for k in ("method", "spread", "rank", "training")}
        for n in args.n:
            start = time.perf_counter()
            batch = ke.batches(requests[:n], args.batch_size)
            result = edit_and_score(ke.editor, ke.model, ke.modules, batch, EVAL_VIEWS, score_before=position == 0)
            after = {k: float(v.mean()) for k, v in result.values_after.items() if k in SCORES and v.numel()}
            report["editors"][name][str(n)] = after
            if position == 0:
                report["unedited"][str(n)] = {k: float(v.mean()) for k, v in result.values_before.items()
                                              if k in SCORES and v.numel()}
            print(f"{name:<13} N={n:>5}  " + "  ".join(f"{k} {after[k]:.3f}" for k in ("ES", "GS", "LS", "EM_edit")
                                                        if k in after) + f"  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return report


def plot(report: dict, path: Path) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(12, 3.6))
    for ax, score in zip(axes, ("ES", "GS", "LS")):
        ns = sorted(int(n) for n in report["unedited"])
        for name, result in report["editors"].items():
            ax.plot(ns, [result[str(n)].get(score, float("nan")) for n in ns], marker="o", label=name)
        ax.plot(ns, [report["unedited"][str(n)].get(score, float("nan")) for n in ns], linestyle="--", color="gray",
                label="unedited")
        ax.set(xscale="log", xlabel="simultaneous edits N", title=score, ylim=(0, 1))
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path, f"{report['dataset']}: edit quality vs number of simultaneous edits ({report['date']})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATA), default="zsre")
    p.add_argument("--data", help="evaluation file (default: the dataset's evaluation file in ../shared/data)")
    p.add_argument("--format", default="auto", help="record layout of --data")
    p.add_argument("--editors", nargs="*", help="NAME=FOLDER pairs (default: the recipes' exported editors)")
    p.add_argument("--n", type=int, nargs="+", default=[16, 64, 256],
                   help="numbers of simultaneous edits (add 1024 for the full curve: about 8 more minutes per editor)")
    p.add_argument("--model", help="base model (default: the editors')")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON path (default benchmarks/results/edit_quality_<dataset>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    report = evaluate(args)
    out = Path(args.out or f"benchmarks/results/edit_quality_{args.dataset}.json")
    write_json(report, out)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
