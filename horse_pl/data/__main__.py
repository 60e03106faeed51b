"""``python -m horse_pl.data inspect --dataset zsre --path FILE --model embedded:smollm2-135m``

Prints the record count, invalid records with reasons, token-length statistics and three examples
with their prompt and decoded labels, so users can debug their data before training on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from horse_pl.data.batch import EVAL_VIEWS, tokenize_requests
from horse_pl.data.records import FORMATS, RecordError, find_conflicts, load_requests
from horse_pl.data.tokenize import IGNORE_INDEX, TokenizationError
from horse_pl.models import DEFAULT_MODEL, load_tokenizer


def inspect(path: str, dataset: str, model: str, max_length: int, n_examples: int = 3) -> str:
    """Return the inspection report of a data file as text."""
    requests, report = load_requests(path, dataset, skip_invalid=True)
    tokenizer = load_tokenizer(model)
    table = tokenize_requests(tokenizer, requests, EVAL_VIEWS, max_length, where=f"{path}: record",
                              record_ids=report.kept)
    detected = f" (detected: {report.format})" if dataset == "auto" else ""
    lines = [f"file: {path}", f"format: {dataset}{detected}", f"records: {report.n_records}",
             f"valid: {len(requests)}", f"invalid: {report.n_invalid}"]
    lines += [f"  {n} x {why}" for why, n in report.invalid.most_common()]
    duplicates, conflicts = find_conflicts(requests)
    lines.append(f"duplicates (same prompt and target): {duplicates}")
    lines.append(f"conflicts (one prompt, different targets; at most one can hold): {len(conflicts)}")
    lines += [f"  {prompt!r} -> {' / '.join(map(repr, targets))}" for prompt, targets in list(conflicts.items())[:3]]
    lines.append(f"token lengths (prompt + answer, {model}):")
    for view in EVAL_VIEWS:
        lengths = [len(ids) + 1 for ids in table[f"{view}_input_ids"] if ids]
        answers = [sum(t != IGNORE_INDEX for t in lab) for lab in table[f"{view}_labels"] if lab]
        if lengths:
            lines.append(f"  {view:<14} n={len(lengths):<6} min={min(lengths):<4} "
                         f"median={statistics.median(lengths):<6} max={max(lengths):<4} "
                         f"answer tokens: mean={statistics.mean(answers):.2f} max={max(answers)}")
    for i in range(min(n_examples, len(requests))):
        row = table[i]  # the i-th valid record
        lines.append(f"example {i}:")
        for view in ("edit", "rephrase", "locality"):
            ids, labels = row[f"{view}_input_ids"], row[f"{view}_labels"]
            if not ids:
                continue
            first = next(t for t, lab in enumerate(labels) if lab != IGNORE_INDEX)
            prompt = tokenizer.decode(ids[:first + 1])
            answer = tokenizer.decode([lab for lab in labels if lab != IGNORE_INDEX])
            lines.append(f"  {view:<9} prompt={prompt!r} labels={answer!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m horse_pl.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarise a data file: counts, invalid records, token lengths, examples")
    p.add_argument("--path", required=True, help="JSON/JSONL(.gz) file or Hugging Face dataset id")
    p.add_argument("--dataset", default="auto", choices=("auto",) + FORMATS, help="record layout")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model whose tokenizer to use")
    p.add_argument("--max-length", type=int, default=256, help="longest allowed prompt + answer in tokens")
    p.add_argument("--examples", type=int, default=3, help="how many examples to print")
    args = parser.parse_args(argv)
    try:
        print(inspect(args.path, args.dataset, args.model, args.max_length, args.examples))
    except (RecordError, TokenizationError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
