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
    ``extra_tokens`` (so a user also sees what follows the new answer), read exactly as the edit read the prompt."""
    pairs = tokenize_pairs(tokenizer, [r.prompt for r in requests], [r.target for r in requests], max_length)
    device = next(model.parameters()).device
    answers = []
    for pair in pairs:
        n_prompt = next(i for i, label in enumerate(pair.labels) if label != IGNORE_INDEX) + 1
        ids = torch.tensor([pair.input_ids[:n_prompt]], device=device)
        new = len(pair.answer_ids) + extra_tokens
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=pad)
        answers.append(tokenizer.decode(out[0, n_prompt:], skip_special_tokens=True))
    return answers
