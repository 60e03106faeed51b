"""Second moment of the edit modules' keys on unrelated text (MEMIT's ``C0``), computed once and cached.

``C0 = mean_t k_t k_t^T`` over every token ``t`` of a fixed text sample, per edit module (d_in x d_in).
The closed-form update uses it as a preservation term, ``S = K^T K + exp(lambda) I + mu C0``: the solve
then also keeps the module's outputs on those keys, weighed as ``mu`` tokens' worth of unrelated text.
The sample is taken from the general-ability data and is disjoint from the perplexity sample that
measures retention, so the score that checks preservation is not the text it was fitted on.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from horse_pl.edit_modules import get_modules
from horse_pl.models import cache_dir, model_fingerprint

DEFAULT_GENERAL_DATA = "../shared/data/general"
PERPLEXITY_TEXTS = 64  # the first summaries measure perplexity (horse_pl.sequential.general); C0 uses the rest


def preservation_texts(root: str | Path = DEFAULT_GENERAL_DATA, n: int = 512) -> list[str]:
    """``n`` plain-English texts for ``C0``: dialogue summaries and open-domain questions with their answers,
    none of them in the perplexity sample."""
    base = Path(root) / "model_editing_hurt"
    summaries, questions = base / "test-summarization.json.gz", base / "test-OpenDomainQA.jsonl.gz"
    for path in (summaries, questions):
        if not path.is_file():
            raise FileNotFoundError(f"Preservation text '{path}' is missing; point general_data at the folder that "
                                    "holds model_editing_hurt/ (../shared/data/general).")
    with gzip.open(summaries, "rt") as handle:
        texts = [r["summary"].strip() for r in json.load(handle)[PERPLEXITY_TEXTS:]]
    with gzip.open(questions, "rt") as handle:
        records = [json.loads(line) for line in handle]
    # the QA retention task reads the first examples of this file: take questions from its end
    qa = [f"Question: {r['question'].rstrip('?')}?\nAnswer: {r['answer'][0]}" for r in reversed(records)]
    mixed = [text for pair in zip(texts, qa) for text in pair]  # alternate the two kinds, so any n mixes them
    return mixed[:n]


class _Stop(Exception):
    """Raised after the highest edit module: the rest of the network is not needed."""


@torch.no_grad()
def key_second_moments(model: nn.Module, tokenizer, modules: Sequence[nn.Module], texts: Sequence[str],
                       batch_size: int = 16, max_length: int = 128) -> list[torch.Tensor]:
    """``mean_t k_t k_t^T`` of each module's input over every non-padding token of ``texts`` (fp32)."""
    sums: list[torch.Tensor | None] = [None] * len(modules)
    count, fired = 0, set()
    mask_now: list[torch.Tensor] = []

    def make_hook(i: int):
        def hook(module, inputs, output):
            keys = inputs[0][mask_now[0]].double()
            sums[i] = keys.T @ keys if sums[i] is None else sums[i] + keys.T @ keys
            fired.add(i)
            if len(fired) == len(modules):  # every edit module has its keys: skip the layers above
                raise _Stop
        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length)
            mask_now[:] = [enc["attention_mask"].bool().to(device)]
            count += int(mask_now[0].sum())
            fired.clear()
            try:
                model(input_ids=enc["input_ids"].to(device), attention_mask=mask_now[0].long())
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return [(s / count).float() for s in sums]


def cached_key_moments(model: nn.Module, tokenizer, module_names: Sequence[str],
                       general_data: str | Path = DEFAULT_GENERAL_DATA, n_texts: int = 512) -> list[torch.Tensor]:
    """:func:`key_second_moments` of the named edit modules on :func:`preservation_texts`, cached under the
    model's fingerprint (``$HORSE_PL_CACHE/key_stats``); recomputed when the model, modules or texts change."""
    texts = preservation_texts(general_data, n_texts)
    key = hashlib.sha256(json.dumps([model_fingerprint(model), list(module_names), texts]).encode()).hexdigest()[:24]
    path = cache_dir() / "key_stats" / f"{key}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return [stored[name] for name in module_names]
    moments = key_second_moments(model, tokenizer, get_modules(model, module_names), texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({n: m.contiguous() for n, m in zip(module_names, moments)}, str(tmp))
    tmp.replace(path)
    return moments


def bind_preservation(editor, model: nn.Module, tokenizer, module_names: Sequence[str],
                      general_data: str | Path = DEFAULT_GENERAL_DATA) -> None:
    """Give ``editor`` the key moments its update stage needs (nothing when it has no preservation term)."""
    if editor.update.needs_key_moments:
        editor.bind_key_moments(cached_key_moments(model, tokenizer, module_names, general_data))
