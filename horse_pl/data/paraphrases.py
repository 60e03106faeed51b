"""A paraphrase bank: the rephrasings a records file pairs with each question template, so that a loss on an edit
prompt can also read the same request asked in other words.

A template is a prompt with its subject replaced by ``{}`` (``"What is the native language of {}?"``). The bank maps
each template of a records file's edit prompts to the templates of their rephrase prompts, counted; an edit request
whose prompt has a known template is rephrased by filling the most frequent of them with its own subject. Requests
with no subject, or whose template the file never asks, get none. Build the bank from records the edits being tuned
or scored are not among (the training file's first records; the development split is its end): a request's own
rephrase must not be in it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence

from horse_pl.data.records import EditRequest

SLOT = "{}"


def template(prompt: str, subject: str | None) -> str | None:
    """``prompt`` with its first ``subject`` replaced by ``{}`` and runs of whitespace made single spaces, or None
    when there is no subject or the prompt does not name it (or already holds braces, which a template cannot
    keep apart from its slot)."""
    if not subject or subject not in prompt or "{" in prompt or "}" in prompt:
        return None
    return " ".join(prompt.replace(subject, SLOT, 1).split())


class ParaphraseBank:
    """Question templates -> their rephrase templates, counted, from (prompt, rephrase, subject) records."""

    def __init__(self, records: Iterable[EditRequest]):
        self.rephrasings: dict[str, Counter] = {}
        for record in records:
            asked, rephrased = template(record.prompt, record.subject), template(record.rephrase or "", record.subject)
            if asked and rephrased and rephrased != asked:
                self.rephrasings.setdefault(asked, Counter())[rephrased] += 1

    def __len__(self) -> int:
        return len(self.rephrasings)

    def templates_for(self, request: EditRequest, k: int) -> list[str]:
        """The ``k`` most frequent rephrase templates of ``request``'s question template (first seen first among
        equals), fewer where the bank knows fewer, none where it does not know the template."""
        if k < 0:
            raise ValueError(f"The number of rephrasings per request must be at least 0, not {k}.")
        counts = self.rephrasings.get(template(request.prompt, request.subject) or "")
        return [t for t, _ in counts.most_common(k)] if counts else []

    def rephrased(self, requests: Sequence[EditRequest], k: int) -> list[EditRequest]:
        """Every request asked in up to ``k`` other words (:meth:`templates_for` filled with its subject), same
        target; requests the bank cannot rephrase add nothing."""
        return [dataclasses.replace(r, prompt=t.replace(SLOT, r.subject, 1))
                for r in requests for t in self.templates_for(r, k)]

    def coverage(self, requests: Sequence[EditRequest], k: int) -> dict[str, float]:
        """How much of ``requests`` the bank rephrases with ``k`` templates: the share with at least one rephrasing,
        and the share whose own rephrase prompt is among them (where a gain on that prompt is a gain on a phrasing
        the bank's file had already asked, not generalisation to new words)."""
        n = max(len(requests), 1)
        used = [(r, self.templates_for(r, k)) for r in requests]
        return {"rephrased": sum(bool(t) for _, t in used) / n,
                "own_rephrase_in_bank": sum(template(r.rephrase or "", r.subject) in t for r, t in used if t) / n}
