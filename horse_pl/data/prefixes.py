"""Context prefixes (MEMIT's): short texts the model itself writes, put before an edit prompt so that a loss on the
prompt also sees it in other contexts than the prompt alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from horse_pl.data.records import EditRequest

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")  # MEMIT's openings


@torch.no_grad()
def context_prefixes(model: nn.Module, tokenizer, n: int, n_tokens: int = 10, seed: int = 0) -> list[str]:
    """``n`` prefixes of about ``n_tokens`` tokens each, sampled from the model (top 5) after MEMIT's opening words
    in turn (behind the tokenizer's start token), the same for the same model and ``seed``; each ends in ``.`` so the
    prompt starts a new sentence."""
    if n < 0:
        raise ValueError(f"The number of context prefixes must be at least 0, not {n}.")
    prefixes = []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(n):
            ids = tokenizer(SEED_WORDS[i % len(SEED_WORDS)])["input_ids"]
            if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
                ids = [tokenizer.bos_token_id, *ids]  # a text's start, which a bare word does not read as
            ids = torch.tensor([ids], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, do_sample=True,
                                 top_k=5, pad_token_id=pad)
            text = " ".join(tokenizer.decode(out[0], skip_special_tokens=True).replace("{", " ").replace("}", " ")
                            .split())
            prefixes.append(text.rstrip(".") + ".")
    return prefixes


def with_prefixes(requests: Sequence[EditRequest], prefixes: Sequence[str]) -> list[EditRequest]:
    """Every request behind every prefix (prefix-major): the prompt becomes ``prefix + " " + prompt``."""
    return [dataclasses.replace(r, prompt=f"{prefix} {r.prompt}") for prefix in prefixes for r in requests]
