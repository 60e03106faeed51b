"""Language-model passes that compute logits only where a label is (the answer positions).

A micro-batch runs as trimmed row groups (:mod:`horse_pl.lm.rows`), with the last MLP at the answer
positions only (:mod:`horse_pl.lm.last_mlp`) and a prefix common to all rows run once
(:mod:`horse_pl.lm.prefix`). Losses go through the fused cross-entropy (:mod:`horse_pl.lm.cross_entropy`),
which never holds the answer tokens' full logits; scoring, which needs them, uses :func:`answer_logits`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from horse_pl.data.tokenize import IGNORE_INDEX
from horse_pl.lm.cross_entropy import capped_logits, linear_cross_entropy, softcap_of
from horse_pl.lm.last_mlp import last_mlp_rows
from horse_pl.lm.prefix import shared_prefix_length
from horse_pl.lm.replay import replaying
from horse_pl.lm.rows import row_groups


def _answer_hidden(model: nn.Module, group: dict[str, torch.Tensor], trim_last_mlp: bool = True,
                   share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states and labels at the labelled positions of one row group (with ``trim_last_mlp``,
    the last MLP runs at those positions only; with ``share_prefix``, a prefix common to all rows runs once)."""
    ids, mask, labels = group["input_ids"], group["attention_mask"], group["labels"]
    answer = labels != IGNORE_INDEX
    # under replay a whole row group's lower layers are recorded once and replayed, which saves far more than a
    # prefix run once (and a pass through a key-value cache cannot be replayed)
    prefix = shared_prefix_length(group) if share_prefix and not replaying(model) else 0
    cache = None
    if prefix:
        # the prefix's keys and values, computed once (its own last MLP output is never read)
        with last_mlp_rows(model, answer.new_zeros(1, prefix)) if trim_last_mlp else nullcontext():
            cache = model.base_model(input_ids=ids[:1, :prefix], use_cache=True).past_key_values
        cache.batch_repeat_interleave(ids.shape[0])
        ids, labels, answer = ids[:, prefix:], labels[:, prefix:], answer[:, prefix:]
    with last_mlp_rows(model, answer) if trim_last_mlp else nullcontext():
        hidden = model.base_model(
            input_ids=ids, attention_mask=None if bool(mask.all()) else mask,
            past_key_values=cache, use_cache=cache is not None,
        ).last_hidden_state
    return hidden[answer], labels[answer]


def group_answer_logits(model: nn.Module, group: dict[str, torch.Tensor],
                        whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and labels at the labelled positions of one row group, as (n_tokens, vocab) and (n_tokens,);
    ``whole`` runs every position through every layer (no trimmed last MLP, no shared prefix)."""
    hidden, labels = _answer_hidden(model, group, trim_last_mlp=not whole, share_prefix=not whole)
    return capped_logits(model.get_output_embeddings(), hidden, softcap_of(model)), labels


def group_answer_ce_sum(model: nn.Module, group: dict[str, torch.Tensor], trim_last_mlp: bool = True,
                        share_prefix: bool = True) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens of one row group."""
    hidden, labels = _answer_hidden(model, group, trim_last_mlp, share_prefix)
    return linear_cross_entropy(hidden, model.get_output_embeddings(), labels, softcap_of(model))


def answer_logits(model: nn.Module, micro_batch: dict[str, torch.Tensor],
                  around_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and labels at the labelled positions of a micro-batch, as (n_tokens, vocab) and (n_tokens,).

    Only the answer positions go through the output projection, which for small models with large
    vocabularies is a sizeable share of the forward pass; rows run in trimmed groups (:func:`row_groups`).
    ``around_group(group)``, when given, is a context each row group's pass runs in (whole sequences, every
    position through every layer, so position masks of the group line up with each module's input).
    """
    parts = []
    for group in row_groups(micro_batch):
        with around_group(group) if around_group is not None else nullcontext():
            parts.append(group_answer_logits(model, group, whole=around_group is not None))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def sequence_sums(token_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence of a micro-batch, the sum of ``token_values`` (one value per answer token, in row order, as
    :func:`answer_logits` returns them) over its answer tokens (``labels``: the micro-batch's, batch x seq)."""
    rows = (labels != IGNORE_INDEX).nonzero()[:, 0]  # the sequence of each answer token
    return torch.zeros(labels.shape[0], device=token_values.device, dtype=token_values.dtype).index_add_(
        0, rows, token_values)


def answer_ce(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a micro-batch (its row groups' answer states go through
    the output projection together: one larger matrix product runs faster than several small ones)."""
    parts = [_answer_hidden(model, group) for group in row_groups(micro_batch)]
    hidden, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return linear_cross_entropy(hidden, model.get_output_embeddings(), labels, softcap_of(model)) / len(labels)


def unlanded_answer_ce(model: nn.Module, micro_batch: dict[str, torch.Tensor], target: float,
                       around_group=None) -> torch.Tensor:
    """Summed answer-token cross-entropy of the requests of a micro-batch whose answer tokens' geometric-mean
    probability is below ``target`` (all of them at ``target=1``); ``around_group`` as in :func:`answer_logits`."""
    logits, labels = answer_logits(model, micro_batch, around_group)
    token_ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    if target >= 1:
        return token_ce.sum()
    labels = micro_batch["labels"]
    mean_ce = sequence_sums(token_ce.detach(), labels) / sequence_sums(torch.ones_like(token_ce), labels).clamp_min(1)
    rows = (labels != IGNORE_INDEX).nonzero()[:, 0]  # the sequence of each answer token
    return (token_ce * (mean_ce > -math.log(target))[rows]).sum()
