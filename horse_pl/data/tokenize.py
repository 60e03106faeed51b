"""One tokenisation routine for every dataset: prompt + answer -> input ids and next-token labels.

The answer is tokenised *in context* (``prompt + " " + answer`` in one call) and its tokens are found
by character offsets, so the labels are exactly the tokens the model reads after the prompt; a
separately tokenised answer can gain a stray lone-space piece on some tokenizers.

Labels are already shifted: ``labels[t]`` is the token the model should predict at position ``t``
(``-100`` elsewhere), so logits and labels line up without another shift and the positions with a
label are the ones where keys and value gradients are captured.

Given the request's subject, a pair also records ``key_pos``: the position of the subject's last token in the
prompt (its last occurrence), where editors with ``positions="subject"`` capture their keys (MEMIT's key).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class TokenizationError(ValueError):
    """A prompt/answer pair cannot be tokenised as required (too long, empty answer, merged boundary)."""


@dataclass(frozen=True)
class Tokenized:
    """``input_ids`` of prompt + answer (without the answer's last token) and aligned ``labels``."""

    input_ids: list[int]
    labels: list[int]
    key_pos: int = -1  # the subject's last prompt token, -1 where no subject was given or found

    @property
    def answer_ids(self) -> list[int]:
        return [t for t in self.labels if t != IGNORE_INDEX]


def join(prompt: str, answer: str) -> tuple[str, str]:
    """Return (full text, answer as it appears in it): a space separates them unless one is there already."""
    sep = "" if prompt.endswith((" ", "\n")) or answer.startswith(" ") else " "
    return prompt + sep + answer, sep + answer


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], max_length: int = 256,
    where: str = "record", record_ids: Sequence[int] | None = None, subjects: Sequence[str | None] | None = None,
) -> list[Tokenized]:
    """Tokenise many (prompt, answer) pairs; raise :class:`TokenizationError` naming the bad pair
    (``where`` and ``record_ids[i]``, the record's index in its file). With ``subjects``, each pair's ``key_pos`` is
    the token holding the last character of its subject's last occurrence in the prompt (-1 if it is absent)."""
    texts = [join(p, a)[0] for p, a in zip(prompts, answers)]
    enc = tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True, add_special_tokens=True)
    out = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        name = f"{where} {record_ids[i] if record_ids is not None else i}"
        ids, offsets, special = enc["input_ids"][i], enc["offset_mapping"][i], enc["special_tokens_mask"][i]
        # Special tokens appended after the text (an EOS some tokenizers add) are not part of the answer.
        while ids and special[-1]:
            ids, offsets, special = ids[:-1], offsets[:-1], special[:-1]
        boundary = len(prompt)
        answer_pos = [j for j, ((start, end), s) in enumerate(zip(offsets, special)) if not s and start >= boundary]
        straddles = [j for j, ((start, end), s) in enumerate(zip(offsets, special)) if not s and start < boundary < end]
        if straddles:
            raise TokenizationError(f"{name}: the tokenizer merges the end of the prompt {prompt[-20:]!r} with the "
                                    f"answer {answer!r} into one token; end the prompt with punctuation or a space.")
        if not answer_pos or not answer.strip():
            raise TokenizationError(f"{name}: the answer {answer!r} tokenises to nothing; give a non-empty answer.")
        if len(ids) > max_length:
            raise TokenizationError(f"{name}: prompt + answer is {len(ids)} tokens, over max_length={max_length}; "
                                    "shorten it or raise max_length.")
        first = answer_pos[0]
        if first == 0:
            raise TokenizationError(f"{name}: the prompt {prompt!r} tokenises to nothing; give a non-empty prompt.")
        labels = [IGNORE_INDEX] * (first - 1) + ids[first:]
        subject = subjects[i] if subjects is not None else None
        out.append(Tokenized(input_ids=ids[:-1], labels=labels, key_pos=_subject_end(prompt, subject, offsets)))
    return out


def _subject_end(prompt: str, subject: str | None, offsets) -> int:
    """The position of the token that holds the last character of ``subject``'s last occurrence in ``prompt``."""
    at = prompt.rfind(subject) if subject and subject.strip() else -1
    if at < 0:
        return -1
    last = at + len(subject.rstrip()) - 1
    return next((j for j, (start, end) in enumerate(offsets) if start <= last < end), -1)


def collate(examples: Sequence[Tokenized], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch into ``input_ids``, ``attention_mask`` and ``labels`` tensors, and ``key_mask`` (True
    at each sequence's ``key_pos``) when any sequence has a subject position."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(e.key_pos >= 0 for e in examples):
        batch["key_mask"] = torch.zeros((len(examples), width), dtype=torch.bool)
        for row, e in enumerate(examples):
            if e.key_pos >= 0:
                batch["key_mask"][row, e.key_pos] = True
    return batch
