"""The edit batch: requests tokenised into *views*, each a list of right-padded micro-batches.

A view is one kind of sequence of the requests:

- ``edit`` (prompt + target), ``rephrase`` (rephrase + target), ``locality`` (unrelated prompt + its answer);
- for evaluation also ``portability`` and, where the overwritten fact is known, ``edit_true``,
  ``rephrase_true`` (prompts + the old answer) and ``locality_new`` (unrelated prompt + the new target),
  used by the CounterFact probability scores.

``View.rows`` gives, for each sequence of a view, its position in the edit batch, and ``EditBatch.index``
each request's record index in its data file, so scores can be reported per request. Training, validation,
``KnowledgeEditor.edit``, the sequential runner and the benchmarks all build their batches here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import datasets
import torch

from horse_pl.data.records import EditRequest
from horse_pl.data.tokenize import Tokenized, collate, tokenize_pairs

TRAIN_VIEWS = ("edit", "rephrase", "locality")
EVAL_VIEWS = TRAIN_VIEWS + ("portability", "edit_true", "rephrase_true", "locality_new")
# view -> (prompt field, answer field) of EditRequest
VIEW_FIELDS = {
    "edit": ("prompt", "target"),
    "rephrase": ("rephrase", "target"),
    "locality": ("locality_prompt", "locality_answer"),
    "portability": ("portability_prompt", "portability_answer"),
    "edit_true": ("prompt", "ground_truth"),
    "rephrase_true": ("rephrase", "ground_truth"),
    "locality_new": ("locality_prompt", "target"),
}

KEY_VIEW = "edit"  # the view whose sequences the edits' keys are captured on: it alone records subject positions
MicroBatch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels (batch x seq); key_mask in the edit view


@dataclass
class View:
    """The sequences of one view: ``micro_batches`` in order, and ``rows``, each sequence's position in the batch."""

    micro_batches: list[MicroBatch] = field(default_factory=list)
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __iter__(self) -> Iterator[MicroBatch]:
        return iter(self.micro_batches)

    def __len__(self) -> int:
        """The number of micro-batches (:attr:`n_sequences` counts sequences)."""
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> MicroBatch:
        return self.micro_batches[i]

    @property
    def n_sequences(self) -> int:
        return len(self.rows)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> View:
        return View([{k: v.to(device, non_blocking=non_blocking) for k, v in mb.items()} for mb in self.micro_batches],
                    self.rows)

    def shard(self, rank: int, world_size: int) -> View:
        """Micro-batches ``rank::world_size`` and the rows of their sequences."""
        start, kept = 0, []
        for i, mb in enumerate(self.micro_batches):
            n = mb["input_ids"].shape[0]
            if i % world_size == rank:
                kept.append(self.rows[start:start + n])
            start += n
        return View(self.micro_batches[rank::world_size], torch.cat(kept) if kept else self.rows[:0])


@dataclass
class EditBatch:
    """``n_edits`` requests edited together: their record ``index`` and one :class:`View` per kind of sequence."""

    index: torch.Tensor
    views: dict[str, View]

    @property
    def n_edits(self) -> int:
        return len(self.index)

    def __getitem__(self, view: str) -> View:
        return self.views[view]

    def __contains__(self, view: str) -> bool:
        return view in self.views

    def get(self, view: str) -> View | None:
        """The view, or None where the batch has no sequence of it."""
        found = self.views.get(view)
        return found if found else None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EditBatch:
        """On ``device`` (Lightning moves batches through this method)."""
        return EditBatch(self.index, {name: v.to(device, non_blocking) for name, v in self.views.items()})

    def shard(self, rank: int, world_size: int) -> EditBatch:
        """This process's part of a global edit batch under DDP: micro-batches ``rank::world_size`` of every view.

        Every process collates the same global edit batch, so the micro-batches, and with them every loss
        term, are exactly those of one process on the whole batch; sums all-reduced across processes then
        give the single-process result.
        """
        if world_size == 1:
            return self
        return EditBatch(self.index, {name: v.shard(rank, world_size) for name, v in self.views.items()})


def tokenize_requests(
    tokenizer, requests: Sequence[EditRequest], views: Sequence[str], max_length: int, where: str = "record",
    record_ids: Sequence[int] | None = None,
) -> datasets.Dataset:
    """Tokenise every view of every request into a ``datasets.Dataset`` (an absent view is an empty list)."""
    columns: dict[str, list] = {"index": list(record_ids) if record_ids is not None else list(range(len(requests)))}
    for view in views:
        prompt_field, answer_field = VIEW_FIELDS[view]
        present = [i for i, r in enumerate(requests)
                   if getattr(r, prompt_field) is not None and getattr(r, answer_field) is not None]
        pairs = tokenize_pairs(
            tokenizer, [getattr(requests[i], prompt_field) for i in present],
            [getattr(requests[i], answer_field) for i in present], max_length, where=f"{where} ({view})",
            record_ids=[record_ids[i] if record_ids is not None else i for i in present],
            subjects=[requests[i].subject for i in present] if view == KEY_VIEW else None,
        ) if present else []
        ids, labels, key_pos = [[] for _ in requests], [[] for _ in requests], [-1] * len(requests)
        for i, tok in zip(present, pairs):
            ids[i], labels[i], key_pos[i] = tok.input_ids, tok.labels, tok.key_pos
        columns[f"{view}_input_ids"], columns[f"{view}_labels"] = ids, labels
        if view == KEY_VIEW:
            columns[f"{view}_key_pos"] = key_pos
    return datasets.Dataset.from_dict(columns)


class EditCollator:
    """Turn the rows of one edit batch into an :class:`EditBatch` with micro-batches of ``batch_size`` sequences."""

    def __init__(self, views: Sequence[str], batch_size: int, pad_token_id: int):
        self.views, self.batch_size, self.pad_token_id = tuple(views), batch_size, pad_token_id

    def __call__(self, rows: list[dict]) -> EditBatch:
        views = {}
        for view in self.views:
            present = [(pos, Tokenized(r[f"{view}_input_ids"], r[f"{view}_labels"], r.get(f"{view}_key_pos", -1)))
                       for pos, r in enumerate(rows) if r[f"{view}_input_ids"]]
            # Sequences of similar length share a micro-batch, so little compute is spent on padding.
            present.sort(key=lambda item: len(item[1].input_ids))
            examples = [t for _, t in present]
            views[view] = View([collate(examples[i:i + self.batch_size], self.pad_token_id)
                                for i in range(0, len(examples), self.batch_size)],
                               torch.tensor([pos for pos, _ in present], dtype=torch.long))
        return EditBatch(torch.tensor([r["index"] for r in rows], dtype=torch.long), views)


def edit_batch(tokenizer, requests: Sequence[EditRequest], views: Sequence[str] = EVAL_VIEWS, batch_size: int = 32,
               max_length: int = 256, where: str = "request") -> EditBatch:
    """All ``requests`` as one edit batch (tokenised and collated)."""
    table = tokenize_requests(tokenizer, requests, views, max_length, where=where)
    return EditCollator(views, batch_size, tokenizer.pad_token_id)([table[i] for i in range(len(table))])


def text_batches(tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128) -> list[MicroBatch]:
    """Plain ``texts`` (each cut to ``max_length`` tokens) as right-padded micro-batches labelled at every token, each
    token labelling the position before it, in length order; texts of fewer than two tokens are left out."""
    examples = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) > 1:
            examples.append(Tokenized(ids[:-1], ids[1:]))
    examples.sort(key=lambda e: len(e.input_ids))
    return [collate(examples[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(examples), batch_size)]
