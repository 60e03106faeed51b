"""Greedy continuations of edit prompts: what a user sees an edit change (examples in reports and model cards)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from horse_pl.data.records import EditRequest
from horse_pl.data.tokenize import IGNORE_INDEX, tokenize_pairs


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, requests: Sequence[EditRequest], extra_tokens: int = 3,
                   max_length: int = 256) -> list[str]:
    """The model's greedy continuation of each request's prompt, as many tokens as the target has plus
    ``extra_tokens`` (so a user also sees what follows the new answer), read exactly as the edit read the prompt.
    All prompts decode together, left-padded into one batch: a decoding step of a small model reads every weight
    once whatever the rows, so one batch costs about what one prompt does."""
    if not requests:
        return []
    pairs = tokenize_pairs(tokenizer, [r.prompt for r in requests], [r.target for r in requests], max_length)
    prompts = [pair.input_ids[:next(i for i, label in enumerate(pair.labels) if label != IGNORE_INDEX) + 1]
               for pair in pairs]
    new = [len(pair.answer_ids) + extra_tokens for pair in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, prompts))
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max(new), do_sample=False, pad_token_id=pad)
    eos = model.generation_config.eos_token_id
    stops = set([eos] if isinstance(eos, int) else eos or []) | {pad}
    answers = []
    for row, n in zip(out[:, width:].tolist(), new):
        row = row[:n]  # a row that ended early is padded after its end, as a prompt decoded alone stops there
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        answers.append(tokenizer.decode(row[:end + 1], skip_special_tokens=True))
    return answers
