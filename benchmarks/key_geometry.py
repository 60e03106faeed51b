"""Where an edit's key sits against its paraphrase's and its neighbours' keys, layer by layer.

    python benchmarks/key_geometry.py --dataset counterfact --split dev --n 256

A closed-form edit changes a module's output on every key in proportion to that key's overlap with the edit's keys,
measured in the metric of the preservation term (``C0``, the keys' second moment on unrelated text). So an edit
generalises as far as its paraphrase's key overlaps its own, and damages a neighbour (another subject, same
relation) as far as the neighbour's keys overlap it. For each request of the split and each listed layer's MLP
``down_proj``, this prints the C0-whitened cosine (``cos(C0^-1/2 a, C0^-1/2 b)``) of

- ``answer_rephrase`` / ``answer_neighbour``: the key at the last prompt token (where answer-keyed editors, HORSE
  and MALMEN, capture) against the same position of the paraphrase / of the neighbourhood prompt;
- ``subject_rephrase``: the key at the subject's last token (``positions: subject``, MEMIT's key) against the same
  token of the paraphrase (requests whose paraphrase spells the subject);
- ``subject_neighbour_max``: that key against the most similar key at any position of the neighbourhood prompt
  and answer (position 0 left out: its keys are the attention sink's).

Means over requests, as a JSON record and a PNG (cosine against layer).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import provenance, pyplot, save_figure, write_json  # noqa: E402
from edit_quality import DATA, SHARED, split_requests  # noqa: E402

from horse_pl.arguments import positive_int  # noqa: E402

PAIRS = ("answer_rephrase", "answer_neighbour", "subject_rephrase", "subject_neighbour_max")


def whitener(moment):
    """``C0^-1/2`` (symmetric; eigenvalues floored at 1e-6 of their mean so unused directions stay finite)."""
    import torch

    m = moment.double()
    values, vectors = torch.linalg.eigh(m)
    values = values.clamp_min(1e-6 * float(values.mean()))
    return (vectors * values.rsqrt()) @ vectors.T


def sequence_keys(model, modules, tokenizer, prompts, answers, subjects, batch_size: int = 16):
    """Per sequence: its module inputs (one (T, d_in) tensor per module), its first answer position and subject
    position (-1 when the subject is not in the prompt)."""
    import torch

    from horse_pl.data.tokenize import IGNORE_INDEX, collate, tokenize_pairs

    pairs = tokenize_pairs(tokenizer, prompts, answers, subjects=subjects)
    out, seen = [], {}
    hooks = [m.register_forward_hook(lambda mod, args, output, i=i: seen.__setitem__(i, args[0].double()))
             for i, m in enumerate(modules)]
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            mb = collate(chunk, tokenizer.pad_token_id)
            with torch.no_grad():
                model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"])
            for row, pair in enumerate(chunk):
                n = len(pair.input_ids)
                first_answer = next(t for t, label in enumerate(pair.labels) if label != IGNORE_INDEX)
                out.append(([seen[i][row, :n] for i in range(len(modules))], first_answer, pair.key_pos))
    finally:
        for h in hooks:
            h.remove()
    return out


def measure(args) -> dict:
    import torch

    from horse_pl.editing.key_stats import key_second_moments, preservation_texts
    from horse_pl.models import load_model

    model, tokenizer = load_model(args.model)
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else None
    if layers is None:
        raise SystemExit(f"error: {args.model} has no model.layers[i].mlp.down_proj; this benchmark reads LLaMA-style "
                         "decoders.")
    bad = [i for i in args.layers if not 0 <= i < len(layers)]
    if bad:
        raise SystemExit(f"error: --layers {bad} are outside the model's {len(layers)} layers.")
    modules = [layers[i].mlp.down_proj for i in args.layers]
    requests, source, _ = split_requests(args)
    requests = [r for r in requests[: args.n] if r.rephrase and r.locality_prompt and r.locality_answer]
    texts = preservation_texts(args.general_data, args.texts)
    whiten = [whitener(m) for m in key_second_moments(model, tokenizer, modules, texts)]
    subjects = [r.subject for r in requests]
    edit = sequence_keys(model, modules, tokenizer, [r.prompt for r in requests], [r.target for r in requests],
                         subjects)
    rephrase = sequence_keys(model, modules, tokenizer, [r.rephrase for r in requests], [r.target for r in requests],
                             subjects)
    neighbour = sequence_keys(model, modules, tokenizer, [r.locality_prompt for r in requests],
                              [r.locality_answer for r in requests], [None] * len(requests))

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    values = {layer: {pair: [] for pair in PAIRS} for layer in args.layers}
    for (ek, ea, es), (rk, ra, rs), (nk, na, _) in zip(edit, rephrase, neighbour):
        for i, layer in enumerate(args.layers):
            w = whiten[i]
            e_answer = ek[i][ea] @ w
            values[layer]["answer_rephrase"].append(float(cos(e_answer, rk[i][ra] @ w)))
            values[layer]["answer_neighbour"].append(float(cos(e_answer, nk[i][na] @ w)))
            if es >= 0:
                e_subject = ek[i][es] @ w
                values[layer]["subject_neighbour_max"].append(float(cos(e_subject[None], nk[i][1:] @ w).max()))
                if rs >= 0:
                    values[layer]["subject_rephrase"].append(float(cos(e_subject, rk[i][rs] @ w)))
    layers_out = {str(layer): {pair: (sum(v) / len(v) if v else None) for pair, v in found.items()}
                  for layer, found in values.items()}
    counts = {pair: len(values[args.layers[0]][pair]) for pair in PAIRS}
    return {"kind": "key_geometry", "dataset": args.dataset, "split": args.split, "data": source,
            "n_requests": len(requests), "counts": counts, "layers": layers_out,
            "preservation_texts": len(texts), "model": args.model}


def plot(report: dict, path: Path) -> None:
    layers = [int(k) for k in report["layers"]]
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    for pair, style in zip(PAIRS, ("-o", "--o", "-s", "--s")):
        ax.plot(layers, [report["layers"][str(k)][pair] for k in layers], style, label=pair.replace("_", " "))
    ax.set(xlabel="layer (mlp.down_proj input)", ylabel="C0-whitened cosine", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, f"{report['dataset']} ({report['split']}): edit key against paraphrase and neighbour "
                           f"({report['date'][:10]})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=sorted(DATA), default="counterfact")
    p.add_argument("--split", choices=("eval", "dev"), default="dev")
    p.add_argument("--dev-size", type=positive_int, default=1024, help="size of the development split (the recipes')")
    p.add_argument("--data", help="file to read instead of the dataset's evaluation (or training) file")
    p.add_argument("--format", default="auto", help="record layout of --data")
    p.add_argument("--n", type=positive_int, default=256, help="requests (the first of the split)")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9, 12, 15, 18, 21, 24, 27])
    p.add_argument("--texts", type=positive_int, default=256, help="preservation texts for C0")
    p.add_argument("--general-data", default=str(SHARED / "general"))
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--out", help="JSON path (default benchmarks/results/key_geometry_<dataset>_<split>.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = "python benchmarks/key_geometry.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {**provenance(command), **measure(args)}
    out = Path(args.out or f"benchmarks/results/key_geometry_{args.dataset}_{args.split}.json")
    write_json(report, out)
    plot(report, out.with_suffix(".png"))
    for layer, row in report["layers"].items():
        print(f"layer {layer:>3}  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if v is not None))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
