"""Apply many edits at once with an exported editor, report before/after, save the model or only a delta.

    python edit.py --editor editors/zsre-smollm2 --requests my_edits.json --out edited-model/
    python edit.py --editor editors/zsre-smollm2 --requests my_edits.json --out edits.delta.safetensors --delta
    python edit.py apply-delta --model embedded:smollm2-135m --delta edits.delta.safetensors --out edited-model/
    python edit.py revert-delta --model edited-model/ --delta edits.delta.safetensors --out restored-model/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from horse_pl.api import KnowledgeEditor, apply_delta
from horse_pl.data.records import FORMATS, RecordError, file_sha256, load_requests
from horse_pl.data.tokenize import TokenizationError
from horse_pl.export import EditorLoadError
from horse_pl.io import write_atomic_dir
from horse_pl.models import load_model

USER_ERRORS = (RecordError, TokenizationError, EditorLoadError, FileExistsError, FileNotFoundError,
               ModuleNotFoundError)


def _print_table(summary: dict) -> None:
    names = [n for n in summary["after"] if n in summary["before"]]
    print(f"{'score':<14}{'before':>8}{'after':>8}")
    for name in names:
        print(f"{name:<14}{summary['before'][name]:>8.3f}{summary['after'][name]:>8.3f}")


def run_edit(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"'{out}' already exists; choose another --out or pass --overwrite.")
    requests, report = load_requests(args.requests, args.dataset, skip_invalid=args.skip_invalid, limit=args.limit)
    if report.n_invalid:
        print(f"skipped invalid requests: {report.summary()}", file=sys.stderr)
    unique = {(r.prompt, r.target) for r in requests}
    if len(unique) < len(requests):
        print(f"note: {len(requests) - len(unique)} duplicate requests (same prompt and target) are edited as given",
              file=sys.stderr)
    ke = KnowledgeEditor.from_pretrained(args.editor, model=args.model, dtype=args.dtype, device=args.device)
    shifts, edit_report = ke.edit(requests, batch_size=args.batch_size, max_length=args.max_length)
    _print_table(edit_report["summary"])
    start = time.perf_counter()
    edit_report["timings"] = ke.timings
    edit_report["requests_file"] = {"path": str(args.requests), "sha256": file_sha256(args.requests)}
    if args.delta:
        ke.save_delta(shifts, out, edit_report["requests_file"]["sha256"], overwrite=args.overwrite)
        report_path = out.with_name(out.name + ".edit_report.json")
        report_path.write_text(json.dumps(edit_report, indent=2))
    else:
        def write(folder: Path) -> None:
            ke.model.save_pretrained(folder, safe_serialization=True)
            ke.tokenizer.save_pretrained(folder)
            (folder / "edit_report.json").write_text(json.dumps(edit_report, indent=2))
        write_atomic_dir(out, write, "replace" if args.overwrite else "error")
    ke.timings["save"] = time.perf_counter() - start
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ke.timings.items()))
    print(f"wrote {out}")


def run_delta(args: argparse.Namespace, sign: float) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"'{out}' already exists; choose another --out or pass --overwrite.")
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    for delta in (args.delta if sign > 0 else list(reversed(args.delta))):
        apply_delta(model, delta, sign=sign)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    write_atomic_dir(out, write, "replace" if args.overwrite else "error")
    print(f"wrote {out}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="edit", choices=("edit", "apply-delta", "revert-delta"))
    p.add_argument("--editor", help="exported editor folder (python train.py export)")
    p.add_argument("--requests", help="edit requests: JSON/JSONL(.gz) in the plain, zsRE or CounterFact layout")
    p.add_argument("--dataset", default="auto", choices=("auto",) + FORMATS, help="layout of --requests")
    p.add_argument("--model", help="base model (default: the editor's); for deltas, the model to change")
    p.add_argument("--delta", nargs="*", default=None,
                   help="edit: write only the changed weights to --out; apply/revert: delta files, in edit order")
    p.add_argument("--out", required=True, help="output folder (edited model) or file (delta)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--skip-invalid", action="store_true", help="skip invalid requests (counted) instead of failing")
    p.add_argument("--limit", type=int, default=None, help="edit only the first N records of --requests")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward/backward micro-batch")
    p.add_argument("--max-length", type=int, default=256, help="longest prompt + answer in tokens")
    p.add_argument("--dtype", default="float32", help="dtype of the base model")
    p.add_argument("--device", default="cpu", help="device, e.g. cuda")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "edit":
            if not args.editor or not args.requests:
                raise EditorLoadError("edit needs --editor and --requests.")
            args.delta = args.delta is not None
            run_edit(args)
        else:
            if not args.model or not args.delta:
                raise EditorLoadError(f"{args.command} needs --model and --delta FILE [FILE ...].")
            run_delta(args, 1.0 if args.command == "apply-delta" else -1.0)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
