"""Edit scores as torchmetrics ``Metric``s (DDP-synced) and the one routine that scores sequences.

- ES / GS / LS (HORSE/MALMEN, teacher-forced): per sequence, the fraction of answer tokens whose argmax
  equals the label, averaged over sequences; on edit, rephrase and unrelated prompts.
- LS_agree: fraction of unrelated-answer tokens whose argmax is unchanged by the edit (EasyEdit).
- EM_edit / EM_rephrase: greedy generation reproduces the target. Greedy decoding reproduces the target
  exactly when every teacher-forced argmax is right (each greedy step then sees the teacher-forced
  prefix), so it is computed from the same pass; a test checks it against ``generate``.
- efficacy / paraphrase / neighborhood (MEMIT): P[p(new) > p(true)] on the prompt and the rephrase,
  P[p(true) > p(new)] on the unrelated prompt, comparing mean per-token log-probabilities.
- portability: token accuracy on the portability question where the data has one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from horse_pl.data.batch import EditBatch, View
from horse_pl.lm import answer_logits, sequence_sums
from horse_pl.progress import task

SCORE_NAMES = ("ES", "GS", "LS", "LS_agree", "EM_edit", "EM_rephrase", "portability", "efficacy", "paraphrase",
               "neighborhood")


@dataclass
class SequenceScores:
    """Per-sequence scores of one view (rows: positions in the edit batch)."""

    rows: torch.Tensor
    accuracy: torch.Tensor  # fraction of answer tokens predicted right
    exact: torch.Tensor  # all answer tokens right (= greedy generation reproduces the answer)
    mean_logprob: torch.Tensor
    argmax: list[torch.Tensor]  # per micro-batch, the argmax token at each answer position


@torch.no_grad()
def score_view(model: nn.Module, view: View, advance: Callable[[], None] | None = None) -> SequenceScores:
    """Teacher-forced scores of every sequence of a view (``advance()`` after each micro-batch)."""
    acc, exact, logprob, argmax = [], [], [], []
    for mb in view:
        logits, labels = answer_logits(model, mb)
        pred = logits.argmax(-1)
        right = (pred == labels).float()
        token_lp = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
        n_tok = sequence_sums(torch.ones_like(right), mb["labels"])
        n_right = sequence_sums(right, mb["labels"])
        acc.append(n_right / n_tok)
        exact.append((n_right == n_tok).float())
        logprob.append(sequence_sums(token_lp, mb["labels"]) / n_tok)
        argmax.append(pred)
        if advance is not None:
            advance()
    return SequenceScores(view.rows, _cat(acc), _cat(exact), _cat(logprob), argmax)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0)


def agreement(before: SequenceScores, after: SequenceScores) -> torch.Tensor:
    """Per-token indicator that the argmax did not change (LS_agree)."""
    if not before.argmax:
        return torch.zeros(0)
    return torch.cat([(a == b).float() for a, b in zip(before.argmax, after.argmax)])


def _aligned(first: SequenceScores, second: SequenceScores) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean log-probs of the requests present in both views, in matching order."""
    pos_a = {r: i for i, r in enumerate(first.rows.tolist())}
    pos_b = {r: i for i, r in enumerate(second.rows.tolist())}
    common = [r for r in pos_a if r in pos_b]
    idx_a = torch.tensor([pos_a[r] for r in common], dtype=torch.long)
    idx_b = torch.tensor([pos_b[r] for r in common], dtype=torch.long)
    return first.mean_logprob[idx_a], second.mean_logprob[idx_b]


def compute_scores(
    scores: dict[str, SequenceScores], locality_before: SequenceScores | None
) -> dict[str, torch.Tensor]:
    """Per-sequence values of every score that the available views allow."""
    out: dict[str, torch.Tensor] = {}
    for name, view in (("ES", "edit"), ("GS", "rephrase"), ("LS", "locality"), ("portability", "portability")):
        if view in scores and len(scores[view].rows):
            out[name] = scores[view].accuracy
    for name, view in (("EM_edit", "edit"), ("EM_rephrase", "rephrase")):
        if view in scores and len(scores[view].rows):
            out[name] = scores[view].exact
    if locality_before is not None and "locality" in scores:
        out["LS_agree"] = agreement(locality_before, scores["locality"])
    for name, new, true in (("efficacy", "edit", "edit_true"), ("paraphrase", "rephrase", "rephrase_true")):
        if true in scores and len(scores[true].rows):
            p_new, p_true = _aligned(scores[new], scores[true])
            out[name] = (p_new > p_true).float()
    if "locality_new" in scores and len(scores["locality_new"].rows) and "edit_true" in scores:
        p_true, p_new = _aligned(scores["locality"], scores["locality_new"])
        out["neighborhood"] = (p_true > p_new).float()
    return out


def score_batch(model: nn.Module, batch: EditBatch, views: tuple[str, ...],
                description: str = "score") -> dict[str, SequenceScores]:
    """Score every requested view present in an edit batch (one progress bar, ``description``, over all of them)."""
    present = [v for v in views if batch.get(v)]
    with task(description, sum(len(batch[v]) for v in present)) as advance:
        return {v: score_view(model, batch[v], advance) for v in present}


def make_metrics() -> MetricCollection:
    """One ``MeanMetric`` per score name (sum and count states, reduced across processes)."""
    return MetricCollection({name: MeanMetric() for name in SCORE_NAMES})


def update_metrics(metrics: MetricCollection, values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        if value.numel():
            metrics[name].update(value)
