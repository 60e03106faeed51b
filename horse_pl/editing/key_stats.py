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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from horse_pl.edit_modules import get_modules
from horse_pl.models import cache_dir, model_fingerprint

DEFAULT_GENERAL_DATA = "../shared/data/general"
FACT_VIEWS = ("edit_true", "locality")  # a request's known facts: prompt + true answer, unrelated prompt + answer
DEFAULT_FACT_LIMIT = 4096  # records of a facts file whose answers F is taken over
PERPLEXITY_TEXTS = 64  # the first summaries measure perplexity (horse_pl.sequential.general); C0 uses the rest
PRESERVATION_TEXTS = 512  # the texts C0 is taken over; the preservation texts after them: a held-out sample


def preservation_texts(root: str | Path = DEFAULT_GENERAL_DATA, n: int = PRESERVATION_TEXTS) -> list[str]:
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
def _masked_key_sums(model: nn.Module, modules: Sequence[nn.Module],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     ) -> tuple[list[torch.Tensor], int]:
    """``sum_t k_t k_t^T`` of each module's input over the positions ``t`` that ``positions`` marks, for batches
    of (input_ids, attention_mask, positions) (each batch's product in fp32, summed in fp64), and the number of
    positions summed."""
    sums: list[torch.Tensor | None] = [None] * len(modules)
    count, fired = 0, set()
    mask_now: list[torch.Tensor] = []

    def make_hook(i: int):
        def hook(module, inputs, output):
            keys = inputs[0][mask_now[0]].float()
            batch_sum = (keys.T @ keys).double()  # each batch's product in fp32, the running sum in fp64
            sums[i] = batch_sum if sums[i] is None else sums[i] + batch_sum
            fired.add(i)
            if len(fired) == len(modules):  # every edit module has its keys: skip the layers above
                raise _Stop
        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    device = next(model.parameters()).device
    try:
        for input_ids, attention_mask, positions in batches:
            mask_now[:] = [positions.bool().to(device)]
            count += int(mask_now[0].sum())
            fired.clear()
            try:
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return sums, count


def _masked_second_moments(model: nn.Module, modules: Sequence[nn.Module],
                           batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """``mean_t k_t k_t^T`` of each module's input over the positions ``t`` that ``positions`` marks, for batches
    of (input_ids, attention_mask, positions) (fp32)."""
    sums, count = _masked_key_sums(model, modules, batches)
    return [(s / count).float() for s in sums]


def edit_key_sums(model: nn.Module, modules: Sequence[nn.Module], micro_batches: Sequence[dict[str, torch.Tensor]],
                  positions: str, rows: int | None = None) -> list[torch.Tensor]:
    """``sum K^T K`` (fp64) of each module's update keys on edit prompts, as the model is now: the rows an editor
    that captures at ``positions`` (``answer``, ``subject`` or ``all``, :func:`horse_pl.editing.capture.capture`)
    solves for, from one forward pass without gradients. A lifelong editor's memory of earlier turns' keys.
    ``rows`` regroups the right-padded micro-batches' sequences into batches of that many (many small turns: one
    pass per ``rows`` prompts instead of one per turn)."""
    from horse_pl.editing.capture import record_mask

    batches = [(mb["input_ids"], mb["attention_mask"], record_mask(mb, positions)) for mb in micro_batches]
    sums, _ = _masked_key_sums(model, modules, regrouped(batches, rows) if rows else batches)
    return sums


def regrouped(batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rows: int,
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask, positions) batches as batches of ``rows`` sequences, each as wide as
    its longest sequence: the same sequences in fewer forward passes (a causal model's outputs at a token do not
    depend on the padding after it)."""
    sequences = []
    for input_ids, attention_mask, positions in batches:
        for ids, mask, marked in zip(input_ids, attention_mask, positions):
            n = int(mask.sum())
            if not bool(mask[:n].all()):
                raise ValueError("regrouped needs right-padded batches (attention mask ones, then zeros); this one "
                                 "is padded on the left.")
            sequences.append((ids[:n], marked[:n]))
    for start in range(0, len(sequences), rows):
        group = sequences[start:start + rows]
        width = max(len(ids) for ids, _ in group)
        device = group[0][0].device
        input_ids = torch.zeros((len(group), width), dtype=torch.long, device=device)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long, device=device)
        positions = torch.zeros((len(group), width), dtype=torch.bool, device=device)
        for row, (ids, marked) in enumerate(group):
            input_ids[row, :len(ids)], attention_mask[row, :len(ids)], positions[row, :len(ids)] = ids, 1, marked
        yield input_ids, attention_mask, positions


def key_second_moments(model: nn.Module, tokenizer, modules: Sequence[nn.Module], texts: Sequence[str],
                       batch_size: int = 16, max_length: int = 128) -> list[torch.Tensor]:
    """``mean_t k_t k_t^T`` of each module's input over every non-padding token of ``texts`` (fp32)."""
    def batches():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length)
            yield enc["input_ids"], enc["attention_mask"], enc["attention_mask"]
    return _masked_second_moments(model, modules, batches())


def fact_key_moments(model: nn.Module, tokenizer, modules: Sequence[nn.Module], requests: Sequence,
                     batch_size: int = 32, max_length: int = 256) -> list[torch.Tensor]:
    """``mean_t k_t k_t^T`` of each module's input at the answer tokens of facts the model should keep: each
    request's prompt with its true answer (``edit_true``, where known) and its unrelated prompt with that prompt's
    answer (``locality``). These are the keys an edit meets at other subjects' answers (the neighbourhood), where
    :func:`key_second_moments`' plain text has few."""
    from horse_pl.data.batch import edit_batch
    from horse_pl.data.tokenize import IGNORE_INDEX

    batch = edit_batch(tokenizer, requests, FACT_VIEWS, batch_size, max_length, where="preservation fact")
    micro_batches = [mb for view in FACT_VIEWS for mb in batch[view]]
    if not micro_batches:
        raise ValueError("The preservation facts hold no prompt with a known answer (true answers or unrelated "
                         "prompts with answers); give records of zsRE, CounterFact or the plain layout with them.")
    return _masked_second_moments(model, modules, ((mb["input_ids"], mb["attention_mask"],
                                                    mb["labels"] != IGNORE_INDEX) for mb in micro_batches))


def _dtype(model: nn.Module) -> str:
    """The dtype the model runs in: moments a bf16 model gives differ from an fp32 one's (about 1 % for SmolLM2's C0),
    and the fingerprint, which tells base models apart, is the same for both."""
    return str(next(model.parameters()).dtype)


def _cached(name_parts: list, module_names: Sequence[str], compute) -> list[torch.Tensor]:
    """Moments stored under ``$HORSE_PL_CACHE/key_stats`` by a hash of what they were computed from."""
    key = hashlib.sha256(json.dumps(name_parts).encode()).hexdigest()[:24]
    path = cache_dir() / "key_stats" / f"{key}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return [stored[name] for name in module_names]
    moments = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({n: m.contiguous() for n, m in zip(module_names, moments)}, str(tmp))
    tmp.replace(path)
    return moments


def cached_key_moments(model: nn.Module, tokenizer, module_names: Sequence[str],
                       general_data: str | Path = DEFAULT_GENERAL_DATA,
                       n_texts: int = PRESERVATION_TEXTS) -> list[torch.Tensor]:
    """:func:`key_second_moments` of the named edit modules on :func:`preservation_texts`, cached under the
    model's fingerprint and dtype (``$HORSE_PL_CACHE/key_stats``); recomputed when the model, its dtype, the modules
    or the texts change."""
    texts = preservation_texts(general_data, n_texts)
    return _cached([model_fingerprint(model), _dtype(model), list(module_names), texts], module_names,
                   lambda: key_second_moments(model, tokenizer, get_modules(model, module_names), texts))


def cached_fact_moments(model: nn.Module, tokenizer, module_names: Sequence[str], facts: str | Path,
                        limit: int = DEFAULT_FACT_LIMIT) -> list[torch.Tensor]:
    """:func:`fact_key_moments` of the named edit modules on the first ``limit`` valid records of the records file
    ``facts`` (zsRE, CounterFact, KnowEdit or plain layout), cached like :func:`cached_key_moments` (by the file's
    sha256). Keep the requests you will edit, and any records you tune or report on, out of ``facts``: give the
    editor's training file, whose first records recipes train on and whose last ``dev_size`` they hold out."""
    from horse_pl.data.records import load_requests

    path = Path(facts)
    if not path.is_file():
        raise FileNotFoundError(f"Preservation facts file '{path}' does not exist; give a records file (for example "
                                "the editor's training file) or turn preserve_facts off.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    requests, _ = load_requests(path, skip_invalid=True, limit=limit)
    return _cached([model_fingerprint(model), _dtype(model), list(module_names), "facts", digest, limit], module_names,
                   lambda: fact_key_moments(model, tokenizer, get_modules(model, module_names), requests))


def bind_preservation(editor, model: nn.Module, tokenizer, module_names: Sequence[str],
                      general_data: str | Path = DEFAULT_GENERAL_DATA, facts: str | Path | None = None) -> None:
    """Give ``editor`` the key moments its update stage needs: ``C0`` from ``general_data`` for ``preserve``, ``F``
    from the records file ``facts`` for ``preserve_facts`` (nothing when it has no preservation term)."""
    if editor.update.needs_key_moments:
        editor.bind_key_moments(cached_key_moments(model, tokenizer, module_names, general_data))
    if getattr(editor.update, "needs_fact_moments", False):
        if facts is None:
            raise ValueError(f"The editor's update stage has preserve_facts={editor.update.preserve_facts} but no "
                             "preservation facts file was given; pass one (--preserve-facts-data FILE, "
                             "model.preserve_facts_data) or set preserve_facts to 0.")
        editor.bind_key_moments(cached_fact_moments(model, tokenizer, module_names, facts), kind="fact")
