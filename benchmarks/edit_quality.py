"""Edit quality and general-ability retention against the number of simultaneous edits N.

    python benchmarks/edit_quality.py --dataset zsre                                  # N = 16, 64, 256
    python benchmarks/edit_quality.py --dataset zsre --n 128 512 1024 --general       # the scale curve
    python benchmarks/edit_quality.py --dataset counterfact --n 128 1024 4096 8192 --general
    python benchmarks/edit_quality.py --split dev --editors horse=editors/x horse_mu=editors/x,preserve=1e4

For each editor and each N, N requests (a seeded random draw, the same for every editor; all of them
when N is the split's size) are edited at once with the editor's own code path (capture, predict,
spread, solve) and scored with the shifts applied: ES / GS / LS, LS_agree, generation exact match, and
where the data allows efficacy / paraphrase / neighbourhood and portability; the unedited model's
scores on the same requests come from the same pass. With ``--general`` the edited model's perplexity
on a fixed text sample and its QA accuracy (``../shared/data/general``) are scored against the unedited
model's (retention = after / before). Edit time (capture to solve) and peak memory are recorded per N.
``--trace-every K`` records a refined edit's course in the row's ``trace``: at step 0, every K-th step and the
last, the perplexity retention with that step's shifts and their output change on the C0 texts and on the
preservation texts C0 never saw (``output_change_heldout``).

``--split eval`` (default) reads the evaluation file; ``--split dev`` the last ``--dev-size`` valid
records of the training file, which recipes with ``data.dev_size`` never train on: tune there, report
on eval. An editor is ``NAME=FOLDER`` with optional ``,preserve=MU`` / ``,preserve_facts=MU`` /
``,ridge_per_row=C`` / ``,update=STAGE`` (e.g. ``joint_closed_form``) overriding its update stage (the
same editor, another solve), ``,rounds=R`` (edit R times, each round on the edited model), ``,scale=S``
(every per-layer editing lr times S: the shifts times S, an edit-strength probe) and ``,refine=K[,refine_lr=X]
[,refine_target=P][,refine_preserve=W][,refine_at=all|keys][,refine_prefixes=C][,refine_locality=W]
[,refine_general=W][,refine_paraphrases=P][,refine_budget=B]`` (K Adam
steps on the residuals against the edit prompts' loss through the solve, with C the prompts behind C context prefixes
the model writes, W the KL locality term on the first ``--refine-locality-n`` locality questions of the editor's
training file, ``refine_general`` the KL term on the next tokens of ``--refine-general-n`` preservation texts, and P
the prompts also asked in up to P other words, the rephrasings the first ``--refine-paraphrase-n`` records of the
editor's training file pair with the same question template (on the development split they must all come before it),
B the most the shifts may move the edit modules' outputs on unrelated text, as a share of them:
``horse_pl.editing.editor.Refinement``); each row records that share as ``output_change``;
``preserve_facts`` reads its facts from ``--preserve-facts-data``. The default editors are the exported
recipes:

    gram_schmidt  editors/horse_smollm2_{dataset}            configs/horse_smollm2_{dataset}.yaml
    reference     editors/horse_reference_smollm2_{dataset}  configs/horse_reference_smollm2_{dataset}.yaml
    none          editors/malmen_smollm2_{dataset}           configs/malmen_smollm2_{dataset}.yaml

Writes a JSON record and a PNG plot (quality and retention against N, log x axis).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import provenance, pyplot, save_figure, write_json  # noqa: E402

from horse_pl.arguments import non_negative_int, positive_int  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
DATA = {"zsre": (SHARED / "zsre" / "zsre_eval_1k.json.gz", SHARED / "zsre" / "zsre_train_10k.json.gz"),
        "counterfact": (SHARED / "counterfact" / "counterfact_eval_10k.json.gz",
                        SHARED / "counterfact" / "counterfact_train_10k.json.gz")}
RECIPES = {"gram_schmidt": "horse_smollm2_{}", "reference": "horse_reference_smollm2_{}", "none": "malmen_smollm2_{}"}
SCORES = ("ES", "GS", "LS", "LS_agree", "EM_edit", "EM_rephrase", "efficacy", "paraphrase", "neighborhood",
          "portability")
UPDATE_OPTIONS = {"preserve": float, "ridge_per_row": float, "preserve_facts": float, "update": str, "rounds": int,
                  "scale": float, "refine": int, "refine_lr": float, "refine_target": float, "refine_preserve": float,
                  "refine_at": str, "refine_prefixes": int, "refine_locality": float,
                  "refine_general": float, "refine_paraphrases": int,
                  "refine_budget": float}
REFINEMENT = {"refine": "steps", "refine_lr": "lr", "refine_target": "target", "refine_preserve": "preserve",
              "refine_at": "at", "refine_prefixes": "prefixes", "refine_locality": "locality",
              "refine_general": "general", "refine_paraphrases": "paraphrases",
              "refine_budget": "budget"}
NOT_STAGE = ("update", "rounds", "scale", *REFINEMENT)  # editor options that are not update-stage arguments
EDITOR_SYNTAX = ("NAME=FOLDER[,preserve=MU][,preserve_facts=MU][,ridge_per_row=C][,update=STAGE][,rounds=R][,scale=S]"
                 "[,refine=K][,refine_lr=X][,refine_target=P][,refine_preserve=W][,refine_at=all|keys]"
                 "[,refine_prefixes=C][,refine_locality=W][,refine_general=W][,refine_paraphrases=P]"
                 "[,refine_budget=B]")


def parse_editor(spec: str) -> tuple[str, Path, dict]:
    """An editor given as :data:`EDITOR_SYNTAX` -> (name, folder, options)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"error: --editors takes {EDITOR_SYNTAX}, not '{spec}'.")
    folder, *options = rest.split(",")
    overrides = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in UPDATE_OPTIONS:
            raise SystemExit(f"error: unknown editor option '{key}' in '{spec}'; use {sorted(UPDATE_OPTIONS)}.")
        overrides[key] = UPDATE_OPTIONS[key](value)
    return name, Path(folder), overrides


def _editors(args) -> list[tuple[str, Path, dict]]:
    if args.editors:
        return [parse_editor(spec) for spec in args.editors]
    found, missing = [], []
    for name, recipe in RECIPES.items():
        folder = ROOT / "editors" / recipe.format(args.dataset)
        (found if (folder / "config.json").exists() else missing).append((name, folder, {}))
    for name, folder, _ in missing:
        recipe = folder.name
        print(f"skipping '{name}': no editor in editors/{recipe}; make it with\n"
              f"  python train.py fit --config configs/{recipe}.yaml\n"
              f"  python train.py export --ckpt_path checkpoints/{recipe}/last.ckpt --out editors/{recipe}",
              file=sys.stderr)
    if not found:
        raise SystemExit("error: no editor to evaluate; train and export one with the commands above.")
    return found


def split_requests(args) -> tuple[list, str, int | None]:
    """The requests of ``--split``, a description of where they come from (paths relative to the checkout) and, for
    the development split, the file index of its first record (records before it are the training split's)."""
    from horse_pl.data.records import hold_out_dev, load_requests

    def shown(path) -> str:
        return os.path.relpath(path, ROOT) if Path(path).is_absolute() else str(path)

    eval_path, train_path = DATA[args.dataset]
    if args.split == "eval":
        path = args.data or eval_path
        requests, _ = load_requests(path, args.format, skip_invalid=True)
        return requests, f"{shown(path)} (evaluation records)", None
    path = args.data or train_path
    requests, report = load_requests(path, args.format, skip_invalid=True, require=("rephrase", "locality_prompt"))
    _, _, dev, dev_ids = hold_out_dev(requests, report, args.dev_size)
    return dev, f"{shown(path)} (development split: its last {args.dev_size} valid records)", dev_ids[0]


def residual_fit(update, state) -> list[float]:
    """Per edit module (one number for a joint solve), the share of the spread residuals' energy the solved shifts
    reproduce on their own keys (1: every edit's residual is met; it falls once the answer-token rows outnumber
    the key features there are)."""
    return update.fit(state.update_keys, state.spread_residuals, state.param_shifts)


def bank_breakdown(bank, requests, k: int, gs) -> dict:
    """How much of ``requests`` the paraphrase bank rephrased, and GS apart on the requests whose own rephrase prompt
    the bank's ``k`` rephrasings hold (a phrasing the training file had asked) and on the rest (new words)."""
    import torch

    from horse_pl.data.paraphrases import template

    mask = torch.tensor([template(r.rephrase or "", r.subject) in bank.templates_for(r, k) for r in requests],
                        dtype=torch.bool)
    if len(gs) != len(requests):  # some requests have no rephrase prompt: GS is not per request here
        return bank.coverage(requests, k)
    return {**bank.coverage(requests, k),
            "GS_own_rephrase_in_bank": float(gs[mask].mean()) if mask.any() else None,
            "GS_other": float(gs[~mask].mean()) if (~mask).any() else None}


def refinement_trace(ke, every: int, last: int, moments: dict, texts, before: float, entries: list):
    """A refine hook (:meth:`horse_pl.editing.editor.Editor.register_refine_hook`) that appends to ``entries``, at
    step 0, every ``every``-th step and the ``last``, the perplexity retention of the model with that step's shifts
    on ``texts`` (``before``: the unedited perplexity) and their relative output change on each of ``moments``
    (name: each module's key moments), with the seconds it took."""
    from horse_pl.editing.shifts import applied, relative_output_change
    from horse_pl.sequential.general import perplexity

    def hook(step, shifts):
        if step % every and step != last:
            return
        start = time.perf_counter()
        with applied(ke.modules, shifts):
            after = perplexity(ke.model, ke.tokenizer, texts)
        entry = {"step": step, "perplexity_retention": before / after}
        entry.update({name: relative_output_change(ke.modules, shifts, m) for name, m in moments.items()})
        entries.append({**entry, "seconds": time.perf_counter() - start})
    return hook


def _peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak so far (N grows)


def evaluate(args) -> dict:
    import torch

    from horse_pl.api import KnowledgeEditor
    from horse_pl.data.batch import EVAL_VIEWS
    from horse_pl.edit_modules import get_modules
    from horse_pl.editing.editor import Refinement
    from horse_pl.editing.evaluate import edit_and_score
    from horse_pl.editing.key_stats import (
        PRESERVATION_TEXTS,
        bind_preservation,
        cached_key_moments,
        key_second_moments,
        preservation_texts,
    )
    from horse_pl.editing.shifts import applied, relative_output_change
    from horse_pl.export import load_editor
    from horse_pl.progress import track
    from horse_pl.sequential.general import GeneralCheck, perplexity, perplexity_texts
    from horse_pl.timing import StageTimer

    editors = _editors(args)
    requests, source, first_dev = split_requests(args)
    if (first_dev is not None and args.refine_paraphrase_n > first_dev
            and any(o.get("refine_paraphrases") for _, _, o in editors)):
        raise SystemExit(f"error: --refine-paraphrase-n {args.refine_paraphrase_n} reaches into the development split "
                         f"(it starts at record {first_dev} of the training file), so the bank would hold the "
                         f"requests' own rephrasings; use --refine-paraphrase-n {first_dev} or less.")
    unknown = sorted(set(args.views or ()) - set(EVAL_VIEWS))
    if unknown:
        raise SystemExit(f"error: unknown --views {unknown}; choose from {list(EVAL_VIEWS)}.")
    if len(requests) < max(args.n):
        raise SystemExit(f"error: {source} has {len(requests)} valid requests, fewer than N={max(args.n)}.")
    order = torch.randperm(len(requests), generator=torch.Generator().manual_seed(args.seed)).tolist()
    report = {"kind": "edit_quality", "dataset": args.dataset, "split": args.split, "data": source,
              "seed": args.seed, "views": list(args.views or EVAL_VIEWS), "unedited": {}, "editors": {}}
    ke, general = None, None
    heldout = ppl_texts = ppl_before = None  # what --trace-every reads, computed once
    for name, folder, overrides in editors:
        if ke is None:
            stage = {k: v for k, v in overrides.items() if k not in NOT_STAGE}
            ke = KnowledgeEditor.from_pretrained(folder, model=args.model, dtype=args.dtype, device=args.device,
                                                 update_args=stage, general_data=args.general_data,
                                                 update=overrides.get("update"),
                                                 preserve_facts_data=args.preserve_facts_data)
            if args.general:
                general = GeneralCheck(ke.tokenizer, args.general_data, args.general_tasks, args.general_limit)
                report["general_unedited"] = general.baseline(ke.model)
                report["general_tasks"] = general.task_table()
        else:  # same base model: swap only the editor
            editor, config = load_editor(folder, {k: v for k, v in overrides.items() if k not in NOT_STAGE},
                                         overrides.get("update"))
            if config.base_fingerprint != ke.config.base_fingerprint:
                raise SystemExit(f"error: the editor in {folder} was trained on another base model "
                                 f"('{config.base_model}') than the first editor; compare editors of one model.")
            bind_preservation(editor, ke.model, ke.tokenizer, config.edit_modules, args.general_data,
                              args.preserve_facts_data or config.training.get("preserve_facts_data"))
            ke.editor, ke.config = editor.to(args.device), config
            ke.modules = get_modules(ke.model, config.edit_modules)
        refinement = Refinement(**{field: overrides[key] for key, field in REFINEMENT.items() if key in overrides})
        entry = report["editors"][name] = {
            "folder": str(folder), "update": ke.config.update, "update_args": ke.config.update_args,
            "rounds": overrides.get("rounds", 1), "scale": overrides.get("scale", 1.0),
            "refinement": asdict(refinement) if refinement else None,
            "config": {k: getattr(ke.config, k) for k in ("method", "spread", "rank", "edit_modules", "training")}}
        if "scale" in overrides:
            ke.editor.hypernet.scale_lr(overrides["scale"])
        for n in track(args.n, name):  # one bar per editor; its stages' bars come and go inside
            start = time.perf_counter()
            chosen = [requests[i] for i in order[:n]]
            batch = ke.batches(chosen, args.batch_size)
            extra = ke.refinement_batches(chosen, refinement, n_anchors=args.refine_locality_n,
                                          n_texts=args.refine_general_n, batch_size=args.batch_size,
                                          n_paraphrase_records=args.refine_paraphrase_n)
            unrelated = ke.editor.key_moments or cached_key_moments(ke.model, ke.tokenizer, ke.config.edit_modules,
                                                                    args.general_data)
            trace, handle = [], None
            if args.trace_every and refinement.steps:
                if heldout is None:  # the preservation texts after C0's: a sample of the same kind C0 never saw
                    texts = preservation_texts(args.general_data, 1 << 30)[PRESERVATION_TEXTS:]
                    heldout = key_second_moments(ke.model, ke.tokenizer, ke.modules, texts)
                    ppl_texts = perplexity_texts(args.general_data)
                    ppl_before = perplexity(ke.model, ke.tokenizer, ppl_texts)
                handle = ke.editor.register_refine_hook(refinement_trace(
                    ke, args.trace_every, refinement.steps,
                    {"output_change": unrelated, "output_change_heldout": heldout}, ppl_texts, ppl_before, trace))
            timer = StageTimer(ke.model.device)
            try:
                result = edit_and_score(ke.editor, ke.model, ke.modules, batch, args.views or EVAL_VIEWS,
                                        score_before=str(n) not in report["unedited"], timer=timer,
                                        rounds=overrides.get("rounds", 1), refinement=refinement,
                                        refinement_batches=extra)
            finally:
                if handle is not None:
                    handle.remove()
            row = {k: float(v.mean()) for k, v in result.values_after.items() if k in SCORES and v.numel()}
            row["edit_seconds"] = sum(timer.seconds.get(k, 0.0) for k in ("capture", "predict", "spread", "solve",
                                                                          "refine"))
            if trace:  # the trace's own passes are not the edit's
                row["edit_seconds"] -= sum(entry["seconds"] for entry in trace)
                row["trace"] = trace
            row["answer_rows"] = int(result.state.update_keys[0].shape[0])
            row["residual_fit"] = residual_fit(ke.editor.update, result.state)
            row["output_change"] = relative_output_change(ke.modules, result.state.param_shifts, unrelated)
            row["peak_memory_mb"] = _peak_memory_mb(args.device)
            if refinement.paraphrases and "GS" in result.values_after:
                row["paraphrase_bank"] = bank_breakdown(ke.paraphrase_bank(ke.config.training.get("train_path"),
                                                                           args.refine_paraphrase_n),
                                                        chosen, refinement.paraphrases, result.values_after["GS"])
            if general is not None:
                with applied(ke.modules, result.state.param_shifts):
                    after = general.score(ke.model)
                row["general"] = after
                row["retention"] = general.retention(after)
            entry[str(n)] = row
            if result.values_before is not None:
                report["unedited"][str(n)] = {k: float(v.mean()) for k, v in result.values_before.items()
                                              if k in SCORES and v.numel()}
            shown = [k for k in ("ES", "GS", "LS_agree", "EM_edit", "efficacy", "neighborhood") if k in row]
            ppl = f"  ppl ret {row['retention']['perplexity']:.3f}" if "retention" in row else ""
            print(f"{name:<14} N={n:>5}  " + "  ".join(f"{k} {row[k]:.3f}" for k in shown) + ppl
                  + f"  (edit {row['edit_seconds']:.0f} s, all {time.perf_counter() - start:.0f} s)", flush=True)
    return report


def plot(report: dict, path: Path) -> None:
    scores = [s for s in ("ES", "GS", "LS_agree", "EM_edit", "efficacy", "neighborhood")
              if any(s in row for row in report["unedited"].values())]
    with_general = "general_unedited" in report
    panels = scores + (["perplexity retention"] if with_general else [])
    fig, axes = pyplot().subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    ns = sorted(int(n) for n in report["unedited"])
    for ax, score in zip(axes[0], panels):
        for name, result in report["editors"].items():
            if score == "perplexity retention":
                values = [result[str(n)]["retention"]["perplexity"] for n in ns]
            else:
                values = [result[str(n)].get(score, float("nan")) for n in ns]
            ax.plot(ns, values, marker="o", label=name)
        if score != "perplexity retention":
            ax.plot(ns, [report["unedited"][str(n)].get(score, float("nan")) for n in ns], linestyle="--",
                    color="gray", label="unedited")
        ax.set(xscale="log", xlabel="simultaneous edits N", title=score, ylim=(0, 1.05))
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path, f"{report['dataset']} ({report['split']}): edit quality vs simultaneous edits "
                           f"({report['date'][:10]})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATA), default="zsre")
    p.add_argument("--split", choices=("eval", "dev"), default="eval",
                   help="evaluation records, or the development split held out of the training file")
    p.add_argument("--dev-size", type=positive_int, default=1024, help="size of the development split (the recipes')")
    p.add_argument("--data", help="file to read instead of the dataset's evaluation (or training) file")
    p.add_argument("--format", default="auto", help="record layout of --data")
    p.add_argument("--editors", nargs="*",
                   help=f"{EDITOR_SYNTAX} (default: the recipes' editors)")
    p.add_argument("--refine-locality-n", type=positive_int, default=512,
                   help="a refine_locality term keeps the questions of the valid records among the first N of the "
                        "editor's training file (default 512)")
    p.add_argument("--refine-general-n", type=positive_int, default=64,
                   help="a refine_general term keeps the next-token distributions of the first N preservation texts "
                        "of --general-data (default 64)")
    p.add_argument("--refine-paraphrase-n", type=positive_int, default=8192,
                   help="a refine_paraphrases term rephrases the prompts from the valid records among the first N of "
                        "the editor's training file (default 8192; on the development split, at most its first index)")
    p.add_argument("--trace-every", type=non_negative_int, default=0, metavar="K",
                   help="record a refined edit's course: at step 0, every K-th step and the last, the perplexity "
                        "retention with that step's shifts and their output change on the C0 texts and on held-out "
                        "preservation texts (the row's trace; its seconds are left out of edit_seconds; 0: off)")
    p.add_argument("--n", type=positive_int, nargs="+", default=[16, 64, 256], help="numbers of simultaneous edits")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draw of requests")
    p.add_argument("--views", nargs="*", help="score only these views (default all; e.g. edit rephrase locality for "
                                             "ES / GS / LS / LS_agree / EM at 3/7 of the scoring time)")
    p.add_argument("--general", action="store_true", help="score general-ability retention at every N")
    p.add_argument("--general-data", default=str(SHARED / "general"))
    p.add_argument("--preserve-facts-data", help="records file of the editors' preserve_facts term (default: the one "
                                                 "each editor was trained with)")
    p.add_argument("--general-tasks", nargs="*", default=["open_domain_qa"], help="tasks scored with --general")
    p.add_argument("--general-limit", type=positive_int, default=200, help="examples per general task")
    p.add_argument("--model", help="base model (default: the editors')")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON path (default benchmarks/results/edit_quality_<dataset>_<split>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = "python benchmarks/edit_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    from horse_pl.progress import shown

    with shown():  # progress bars on a terminal, none in CI or in a log file
        report = {**provenance(command), **evaluate(args)}
    out = Path(args.out or f"benchmarks/results/edit_quality_{args.dataset}_{args.split}.json")
    write_json(report, out)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
