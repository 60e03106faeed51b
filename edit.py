"""Apply many edits at once with an exported editor, report before/after, save the model or only a delta.

    python edit.py edit --editor editors/zsre-smollm2 --requests my_edits.json --out edited-model/
    python edit.py edit --editor editors/zsre-smollm2 --requests my_edits.json --out edits.delta.safetensors --delta
    python edit.py apply-delta --model embedded:smollm2-135m --delta edits.delta.safetensors --out edited-model/
    python edit.py revert-delta --model edited-model/ --delta edits.delta.safetensors --out restored-model/
    python edit.py sequential --config configs/sequential/mose_smollm2_counterfact.yaml --out runs/mose-cf/

Without a command, ``edit`` is meant (``--sequential`` or a recipe with ``sequential: true``: ``sequential``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from horse_pl.api import KnowledgeEditor, apply_delta, read_delta, save_model
from horse_pl.arguments import non_negative_float, non_negative_int, positive_float, positive_int, probability
from horse_pl.cards import edited_model_card
from horse_pl.data.records import FORMATS, RecordError, file_sha256, find_conflicts, hold_out_dev, load_requests
from horse_pl.data.tokenize import TokenizationError
from horse_pl.editing.editor import REFINE_AT, Refinement
from horse_pl.editing.key_stats import DEFAULT_GENERAL_DATA
from horse_pl.export import EditorLoadError
from horse_pl.io import OutputError, check_writable, write_atomic_dir, write_atomic_file
from horse_pl.models import load_model
from horse_pl.progress import shown
from horse_pl.sequential.general import DEFAULT_TASKS, GeneralCheck

PROGRESS = {"auto": None, "on": True, "off": False}  # --progress: horse_pl.progress.shown's ``enabled``
USER_ERRORS = (RecordError, TokenizationError, EditorLoadError, FileExistsError, FileNotFoundError,
               ModuleNotFoundError, ValueError, OutputError)


def _check_out(out: Path, overwrite: bool, is_file: bool) -> None:
    """Refuse an --out that exists (without --overwrite), has the wrong kind, or cannot be written: before any work."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"'{out}' already exists; choose another --out or pass --overwrite.")
    if is_file and out.is_dir():
        raise OutputError(f"--out '{out}' is a folder, but --delta writes a file; give a file path such as "
                          f"'{out / 'edits.delta.safetensors'}'.")
    if not is_file and out.exists() and not out.is_dir():
        raise OutputError(f"--out '{out}' is a file, but an edited model is a folder; choose another --out.")
    check_writable(out)


def _print_table(summary: dict) -> None:
    if not summary["after"]:
        print("not scored (--score none)")
        return
    print(f"{'score':<14}{'before':>8}{'after':>8}")
    for name, after in summary["after"].items():
        before = summary["before"].get(name)
        print(f"{name:<14}{'-' if before is None else f'{before:.3f}':>8}{after:>8.3f}")


def _print_general(general: dict) -> None:
    kept = [t for t, row in general["tasks"].items() if row["kept"]]
    print(f"{'general':<20}{'before':>8}{'after':>8}{'retention':>11}")
    for name in kept + ["perplexity"]:
        print(f"{name:<20}{general['before'][name]:>8.3f}{general['after'][name]:>8.3f}"
              f"{general['retention'][name]:>11.3f}")
    dropped = [t for t in general["tasks"] if t not in kept]
    if dropped:
        print(f"(not above chance for the unedited model, left out: {', '.join(dropped)})")


def _note_conflicts(requests) -> None:
    duplicates, conflicts = find_conflicts(requests)
    if duplicates:
        print(f"note: {duplicates} duplicate requests (same prompt and target) are edited as given", file=sys.stderr)
    if conflicts:
        prompt, targets = next(iter(conflicts.items()))
        print(f"warning: {len(conflicts)} prompts have requests with different targets (e.g. {prompt!r} -> "
              f"{' / '.join(map(repr, targets))}); at most one target of each can hold after the edit: keep one "
              "request per prompt", file=sys.stderr)


def run_edit(args: argparse.Namespace) -> None:
    begun = time.perf_counter()
    out = Path(args.out)
    _check_out(out, args.overwrite, is_file=args.delta)
    requests, report = load_requests(args.requests, args.dataset, skip_invalid=args.skip_invalid, limit=args.limit)
    if report.n_invalid:
        print(f"skipped invalid requests: {report.summary()}", file=sys.stderr)
    _note_conflicts(requests)
    update_args = {k: v for k, v in (("preserve", args.preserve), ("ridge_per_row", args.ridge_per_row),
                                     ("preserve_facts", args.preserve_facts)) if v is not None}
    general_data = DEFAULT_GENERAL_DATA if args.general_data is None else args.general_data
    ke = KnowledgeEditor.from_pretrained(args.editor, model=args.model, dtype=args.dtype, device=args.device,
                                         update_args=update_args, general_data=general_data, update=args.update,
                                         preserve_facts_data=args.preserve_facts_data)
    general = None
    if args.general:
        if not general_data:
            raise UsageError("--general needs --general-data (the folder with glue_eval/ and model_editing_hurt/).")
        general = GeneralCheck(ke.tokenizer, general_data, args.general_tasks or DEFAULT_TASKS,
                               args.general_limit or 200)
    shifts, edit_report = ke.edit(requests, batch_size=args.batch_size, max_length=args.max_length, general=general,
                                  score=args.score, rounds=args.rounds, examples=0 if args.score == "none" else 3,
                                  refinement=Refinement(args.refine, args.refine_lr, args.refine_target,
                                                        args.refine_preserve, args.refine_at,
                                                        args.refine_prefixes, args.refine_locality,
                                                        args.refine_general, args.refine_paraphrases,
                                                        args.refine_budget),
                                  anchors=args.refine_locality_data, n_anchors=args.refine_locality_n,
                                  n_texts=args.refine_general_n, paraphrase_data=args.refine_paraphrase_data,
                                  n_paraphrase_records=args.refine_paraphrase_n)
    _print_table(edit_report["summary"])
    if "general" in edit_report:
        _print_general(edit_report["general"])
    for example in edit_report["examples"]:
        before = "" if example["before"] is None else f"before {example['before']!r}  "
        print(f"{example['prompt']!r} -> {example['target']!r}:  {before}after {example['after']!r}")
    start = time.perf_counter()
    edit_report["timings"] = ke.timings
    edit_report["requests_file"] = {"path": str(args.requests), "sha256": file_sha256(args.requests)}
    if args.delta:
        ke.save_delta(shifts, out, edit_report["requests_file"]["sha256"], overwrite=args.overwrite)
        write_atomic_file(out.with_name(out.name + ".edit_report.json"),
                          lambda tmp: tmp.write_text(json.dumps(edit_report, indent=2)), overwrite=True)
    else:
        ke.save(out, args.overwrite, files={
            "edit_report.json": json.dumps(edit_report, indent=2),
            "README.md": edited_model_card(edit_report, ke.config, ke.model_name, args.editor)})
    ke.timings["save"] = time.perf_counter() - start
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ke.timings.items())
          + f"; wall {time.perf_counter() - begun:.1f} from reading the requests to the written output")
    print(f"wrote {out}")


def run_delta(args: argparse.Namespace, sign: float) -> None:
    out = Path(args.out)
    _check_out(out, args.overwrite, is_file=False)
    for delta in args.delta:
        read_delta(delta, tensors=False)  # a missing or foreign delta file is reported before the model is loaded
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    for delta in (args.delta if sign > 0 else list(reversed(args.delta))):
        apply_delta(model, delta, sign=sign)
    save_model(model, tokenizer, out, args.overwrite)
    print(f"wrote {out}")


def run_sequential(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from horse_pl.sequential.runner import SequentialConfig, SequentialRun, result_record

    if args.dev_size:
        # the development split of a training file: its last dev_size valid records, then the first --limit
        requests, report = load_requests(args.requests, args.dataset, skip_invalid=True)
        requests = hold_out_dev(requests, report, args.dev_size)[2][:args.limit]
    else:
        requests, report = load_requests(args.requests, args.dataset, skip_invalid=args.skip_invalid,
                                         limit=args.limit)
    if not requests:
        raise RecordError(f"{args.requests} has no valid edit requests.")
    if report.n_invalid:
        print(f"skipped invalid requests: {report.summary()}", file=sys.stderr)
    cfg = SequentialConfig(**{f.name: getattr(args, f.name) for f in fields(SequentialConfig)
                              if getattr(args, f.name, None) is not None})
    cfg.extra = {"requests": str(args.requests), "requests_sha256": file_sha256(args.requests), "limit": args.limit,
                 "dev_size": args.dev_size}
    start = time.perf_counter()

    def write(folder: Path) -> None:
        result = SequentialRun(cfg, requests, folder).run()
        name = args.record_name or Path(args.out).name
        record = result_record(result, name, " ".join(["python", "edit.py"] + args.argv), args.config)
        (folder / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        names = [n for n in ("efficacy", "paraphrase", "neighborhood", "ES", "GS", "LS") if n in result["unedited"]]
        print(f"{'method':<16}{'when':<12}" + "".join(f"{n:>13}" for n in names)
              + f"{'task ret':>11}{'ppl ret':>9}{'seconds':>9}")
        print(f"{'-':<16}{'unedited':<12}" + "".join(f"{result['unedited'][n]:>13.3f}" for n in names))
        for method, res in result["methods"].items():
            for when in ("post", "after_post"):
                row = f"{method:<16}{when:<12}" + "".join(f"{_fmt(res[when].get(n)):>13}" for n in names)
                if when == "after_post":
                    kept = res.get("retention", {})
                    row += f"{_fmt(kept.get('mean')):>11}{_fmt(kept.get('perplexity')):>9}"
                    row += f"{res['sequence_seconds']:>9.0f}"
                print(row)
    write_atomic_dir(args.out, write, "replace" if args.overwrite else "error")
    print(f"wrote {args.out} (sequential_report.json, its result record, diagnostics.png, tb/) in "
          f"{time.perf_counter() - start:.0f} s")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _mapping(text: str) -> dict:
    """An argparse type: a YAML (or JSON) mapping, such as ``'{mose: {lr: 1e-3}}'``."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"must be a YAML mapping such as '{{mose: {{lr: 1e-3}}}}' ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a YAML mapping such as '{{mose: {{lr: 1e-3}}}}', not {text!r}")
    return value


class UsageError(ValueError):
    """A command line that cannot run as given (a missing or contradictory option)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become one ``error:`` line (main prints it) instead of usage text and an exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see 'python {self.prog} --help').")


COMMANDS = ("edit", "apply-delta", "revert-delta", "sequential")


def _read_recipe(argv: list[str]) -> tuple[Path, dict] | None:
    """The ``--config`` recipe of a command line, as (path, its keys), or None without one."""
    import yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return None
    path = Path(known.config)
    if not path.is_file():
        raise FileNotFoundError(f"Config file '{path}' does not exist; check the path given to --config.")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise UsageError(f"Config file '{path}' is not a mapping of option names to values.")
    return path, values


def _apply_config(p: argparse.ArgumentParser, recipe: tuple[Path, dict] | None) -> None:
    """Defaults from a YAML recipe; keys are the long option names (dashes or underscores)."""
    if recipe is None:
        return
    path, values = recipe
    values = {k: v for k, v in values.items() if k != "sequential"}  # how recipes name their command
    dests = {a.dest for a in p._actions}
    unknown = [k for k in values if k.replace("-", "_") not in dests]
    if unknown:
        raise UsageError(f"Config file '{path}' has unknown keys {unknown}; use the long option names of "
                         f"'python {p.prog} --help'.")
    p.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})


def with_command(argv: list[str], recipe: tuple[Path, dict] | None) -> list[str]:
    """``argv`` with its command first. Without one, ``--sequential`` (or a recipe with ``sequential: true``) means
    ``sequential`` and anything else ``edit``: the command lines of earlier versions keep working."""
    if argv and argv[0] in COMMANDS + ("-h", "--help"):
        return argv
    if "--sequential" in argv:
        return ["sequential"] + [a for a in argv if a != "--sequential"]
    return ["sequential" if recipe and recipe[1].get("sequential") else "edit"] + argv


def _outputs(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, help=what)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--dtype", default="float32", help="dtype of the base model")
    p.add_argument("--progress", choices=tuple(PROGRESS), default="auto",
                   help="progress bars on stderr for capture, refinement, scoring, the general check, turns and "
                        "saving: auto (default) shows them on a terminal unless CI is set")


def _request_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", help="edit requests: JSON/JSONL(.gz) in the plain, zsRE or CounterFact layout "
                                      "(required; a --config recipe may give it)")
    p.add_argument("--dataset", default="auto", choices=("auto",) + FORMATS, help="layout of --requests")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid requests (counted) instead of failing")
    p.add_argument("--limit", type=int, default=None, help="edit only the first N records of --requests")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward/backward micro-batch")
    p.add_argument("--max-length", type=int, default=256, help="longest prompt + answer in tokens")
    p.add_argument("--device", default="cpu", help="device, e.g. cuda")
    p.add_argument("--config", help="YAML recipe whose keys set defaults of these options (configs/sequential/)")


def _general_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--general-data", help="folder with glue_eval/ (default ../shared/data/general; none to skip)")
    p.add_argument("--general-tasks", nargs="*", help="general-ability tasks to score before and after")
    p.add_argument("--general-limit", type=int, help="examples per general task (default 200)")


def _edit_parser(p: argparse.ArgumentParser) -> None:
    _request_options(p)
    _outputs(p, "output folder (edited model) or, with --delta, file")
    p.add_argument("--editor", help="exported editor folder, from python train.py export (required; a --config "
                                    "recipe may give it)")
    p.add_argument("--model", help="base model (default: the editor's)")
    p.add_argument("--delta", action="store_true", help="write only the changed weights to --out (a file)")
    p.add_argument("--score", choices=("all", "edit", "none"), default="all",
                   help="all: every view before and after (default); edit: the edit and rephrase prompts after the "
                        "edit (ES, GS, EM); none: no scoring, only the edit")
    p.add_argument("--general", action="store_true",
                   help="also score general abilities (perplexity, QA and choice tasks) before and after the edit")
    _general_options(p)
    p.add_argument("--preserve", type=float, default=None,
                   help="preservation weight mu of the solve (mu C0, C0 the key second moment on unrelated text; "
                        "default: the editor's)")
    p.add_argument("--preserve-facts", type=float, default=None,
                   help="weight mu_f of a second preservation term, mu_f F, F the key second moment at the answers of "
                        "known facts (other subjects' facts, which an edit must leave alone; default: the editor's)")
    p.add_argument("--preserve-facts-data", default=None,
                   help="records file whose true facts give F (its first 4,096 valid records; default: the one the "
                        "editor was trained with); keep the requests you edit out of it")
    p.add_argument("--update", choices=("closed_form", "joint_closed_form"), default=None,
                   help="update stage of the solve (default: the editor's); joint_closed_form solves all edit "
                        "modules together")
    p.add_argument("--ridge-per-row", type=float, default=None,
                   help="extra ridge c N growing with the N key rows (default: the editor's)")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="edit this many times, each round on the model the earlier ones edited (default 1); every "
                        "round is about as strong as the first, so more rounds can break the model: measure first")
    p.add_argument("--refine", type=non_negative_int, default=0, metavar="K",
                   help="refine the editor's residuals by K Adam steps on the edit prompts' loss through its own solve "
                        "(test-time value optimisation; each step one forward + backward of the edit prompts; "
                        "default 0: the hypernetwork's one step)")
    p.add_argument("--refine-lr", type=positive_float, default=0.1,
                   help="Adam rate of --refine, relative to the RMS of each module's first residuals (default 0.1)")
    p.add_argument("--refine-target", type=probability, default=1.0,
                   help="a request whose answer reaches this probability (geometric mean over its tokens) stops "
                        "pulling the residuals (default 1: every request pulls for all K steps)")
    p.add_argument("--refine-preserve", type=non_negative_float, default=0.0,
                   help="weight of the mean squared output change on unrelated text's keys (the preservation term's "
                        "C0) in the refined loss (default 0)")
    p.add_argument("--refine-at", choices=REFINE_AT, default="all",
                   help="where the refined loss sees the shifts act: all positions (as the edit applies them; "
                        "default) or only the editor's key positions (MEMIT's value optimisation at the subject)")
    p.add_argument("--refine-prefixes", type=non_negative_int, default=0, metavar="C",
                   help="the refined loss also reads every edit prompt behind C short texts the model writes "
                        "(MEMIT's context prefixes, seeded), so the edit holds in other contexts; each adds one pass "
                        "of the edit prompts per step (default 0: the prompts alone)")
    p.add_argument("--refine-locality", type=non_negative_float, default=0.0, metavar="W",
                   help="weight of the mean KL divergence of unrelated questions' answer distributions (before the "
                        "refinement to after) in the refined loss (MALMEN's locality loss, at edit time; default 0)")
    p.add_argument("--refine-locality-data", metavar="FILE",
                   help="records file whose locality questions --refine-locality keeps (default: the file the editor "
                        "was trained on)")
    p.add_argument("--refine-locality-n", type=positive_int, default=512, metavar="N",
                   help="read the questions of the valid records among its first N (default 512)")
    p.add_argument("--refine-general", type=non_negative_float, default=0.0, metavar="W",
                   help="weight of the mean KL divergence of plain texts' next-token distributions (before the "
                        "refinement to after, at every token) in the refined loss: the general data's preservation "
                        "texts, none of them among those perplexity is measured on (default 0)")
    p.add_argument("--refine-general-n", type=positive_int, default=64, metavar="N",
                   help="read the first N preservation texts (default 64)")
    p.add_argument("--refine-paraphrases", type=non_negative_int, default=0, metavar="P",
                   help="the refined loss also reads every edit prompt asked in up to P other words: the rephrase "
                        "prompts that records with the same question template (the prompt with its subject as a slot) "
                        "pair with it, filled with the request's subject; each adds up to one pass of the edit "
                        "prompts per step (default 0; needs records with a subject)")
    p.add_argument("--refine-paraphrase-data", metavar="FILE",
                   help="records file (prompt, rephrase prompt, subject) --refine-paraphrases draws the rephrasings "
                        "from (default: the file the editor was trained on)")
    p.add_argument("--refine-paraphrase-n", type=positive_int, default=8192, metavar="N",
                   help="read the valid records among its first N (default 8192)")
    p.add_argument("--refine-budget", type=non_negative_float, default=0.0, metavar="B",
                   help="the most the refined shifts may move the edited layers' outputs on unrelated text, as a "
                        "share of those outputs (sum of tr(dW^T C0 dW) over sum of tr(W^T C0 W)); residuals past it "
                        "are scaled back onto it after each step (default 0: no bound)")


def _delta_parser(p: argparse.ArgumentParser) -> None:
    _outputs(p, "output folder (the model with the deltas applied or reverted)")
    p.add_argument("--model", required=True, help="the model to change (Hugging Face id or folder)")
    p.add_argument("--delta", nargs="+", required=True, help="delta files (edit --delta), in the order they were made")


def _sequential_parser(p: argparse.ArgumentParser) -> None:
    """The sequential command's options: the request, output and general-ability options shared with ``edit``, and
    one option per :class:`SequentialConfig` setting made with a help text (its type and default from the field)."""
    import typing
    from dataclasses import MISSING, fields

    from horse_pl.sequential.runner import METHODS, SequentialConfig

    _request_options(p)
    _outputs(p, "output folder (sequential_report.json, the result record, plots, tb/)")
    p.add_argument("--dev-size", type=int, default=0,
                   help="edit the development split of a training file given as --requests: its last N valid "
                        "records (the ones recipes with data.dev_size N never train on)")
    hints = typing.get_type_hints(SequentialConfig)
    for f in fields(SequentialConfig):
        if "help" not in f.metadata:
            continue
        hint, default = hints[f.name], f.default if f.default is not MISSING else None
        flag = "--method" if f.name == "methods" else "--" + f.name.replace("_", "-")
        shown = " ".join(default) if isinstance(default, tuple) else default
        kwargs = {"dest": f.name, "help": f.metadata["help"] + ("" if default is None else f" (default {shown})")}
        if f.name == "methods":
            kwargs.update(nargs="+", choices=METHODS)
        elif isinstance(default, tuple):
            kwargs.update(nargs="+", choices=f.metadata.get("choices"))
        elif "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        elif hint is dict:
            kwargs["type"] = _mapping
        elif hint is bool:  # --name sets it, --no-name clears it (a recipe's value is the default)
            kwargs["action"] = argparse.BooleanOptionalAction
        elif int in typing.get_args(hint) or hint is int:
            kwargs["type"] = int
        elif float in typing.get_args(hint) or hint is float:
            # a float setting whose default is none takes 'none' on the command line
            kwargs["type"] = _optional_float if type(None) in typing.get_args(hint) else float
        p.add_argument(flag, **kwargs)
    _general_options(p)
    p.add_argument("--record-name", help="name of the result record written beside the report (default: the "
                                         "--out folder's name; copy it to docs/results/ to publish it)")


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command-line parser and each command's own parser."""
    p = _Parser(prog="edit.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands = {
        "edit": sub.add_parser("edit", help="edit many facts at once with an exported editor (the default)"),
        "apply-delta": sub.add_parser("apply-delta", help="apply delta files to a model"),
        "revert-delta": sub.add_parser("revert-delta", help="revert delta files from a model, bit for bit"),
        "sequential": sub.add_parser("sequential", help="edit the requests turn after turn, never restored"),
    }
    _edit_parser(commands["edit"])
    _delta_parser(commands["apply-delta"])
    _delta_parser(commands["revert-delta"])
    _sequential_parser(commands["sequential"])
    return p, commands


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line as the command's options, with the defaults its ``--config`` recipe gives."""
    recipe = _read_recipe(list(argv))
    argv = with_command(list(argv), recipe)
    p, commands = parser()
    if argv[0] in commands:
        _apply_config(commands[argv[0]], recipe)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(given)
        args.argv = given
        needed = {"edit": ("editor", "requests"), "sequential": ("requests",)}.get(args.command, ())
        missing = [f"--{name}" for name in needed if not getattr(args, name)]
        if missing:
            raise UsageError(f"the following arguments are required: {', '.join(missing)} "
                             f"(see 'python edit.py {args.command} --help').")
        if getattr(args, "general_data", None) is not None and str(args.general_data).lower() == "none":
            args.general_data = ""
        with shown(PROGRESS[args.progress]):
            if args.command == "sequential":
                run_sequential(args)
            elif args.command == "edit":
                run_edit(args)
            else:
                run_delta(args, 1.0 if args.command == "apply-delta" else -1.0)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
