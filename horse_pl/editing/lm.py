"""Language-model passes that compute logits only where a label is (the answer positions).

A micro-batch is right-padded to its longest sequence. Before the forward pass its rows are split
into contiguous groups, each trimmed to its own longest sequence (:func:`row_groups`), so little
compute is spent on padding; with right padding and causal attention the real tokens' outputs do
not depend on how much padding follows them, so the results are those of the padded micro-batch.

Losses (training passes, capture) go through :func:`linear_cross_entropy`, which never holds the
answer tokens' full logits; scoring, which needs them, uses :func:`answer_logits`.

Only the answer positions' final hidden states are read, so the last layer's MLP (a per-position map)
runs at those positions alone (:func:`last_mlp_rows`); its output elsewhere is left at zero, which
nothing downstream reads.

Rows that start with the same tokens (a template such as zsRE's ``nq question:``) share that prefix:
it runs once, as a one-row pass whose keys and values every row then attends to
(:func:`shared_prefix_length`); with causal attention the rows' outputs are those of the full pass.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from horse_pl.data.tokenize import IGNORE_INDEX
from horse_pl.edit_modules import forward_replaced, mlp_output_modules

# Cost of one extra forward call, in padded tokens (per-call overhead and smaller matrix products).
GROUP_OVERHEAD_TOKENS = 64


def row_groups(micro_batch: dict[str, torch.Tensor], overhead: int | None = None) -> list[dict]:
    """Split a right-padded micro-batch into contiguous row groups, each trimmed to its longest sequence.

    The split minimises padded tokens plus ``overhead`` per group (dynamic programming over split
    points); rows keep their order, so per-row results concatenate back in micro-batch order.
    ``overhead`` defaults to :data:`GROUP_OVERHEAD_TOKENS`.
    """
    overhead = GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    lengths = micro_batch["attention_mask"].sum(1).tolist()
    n = len(lengths)
    if n == 0:
        return []
    # best[j]: cost of rows [0, j); cut[j]: start of the last group in that solution
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        width = 0
        for i in range(j - 1, -1, -1):
            width = max(width, lengths[i])
            cost = best[i] + (j - i) * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    groups = []
    for start, end in reversed(bounds):
        width = max(lengths[start:end])
        groups.append({key: value[start:end, :width] for key, value in micro_batch.items()})
    return groups


_LAST_MLP = "_horse_pl_last_mlp"  # cached on the model: the last MLP's name, or "" when there is none


def _last_mlp(model: nn.Module) -> nn.Module | None:
    """The last layer's MLP: the parent of its output projection (None if the model has no such module)."""
    name = model.__dict__.get(_LAST_MLP)
    if name is None:
        try:
            name = mlp_output_modules(model)[-1].rpartition(".")[0]
        except ValueError:
            name = ""
        model.__dict__[_LAST_MLP] = name
    return model.get_submodule(name) if name else None


@contextmanager
def last_mlp_rows(model: nn.Module, rows: torch.Tensor):
    """Inside the block, the last layer's MLP runs only at the positions where ``rows`` (batch x seq) is
    True and outputs zeros elsewhere. Its input reaches the MLP (and its output projection) as one
    sequence of those rows in row-major order, the order of ``hidden[rows]``."""
    mlp = _last_mlp(model)
    if mlp is None:
        yield
        return
    full = mlp.forward

    def forward(hidden: torch.Tensor, *args, **kwargs):
        if hidden.shape[:-1] != rows.shape:
            return full(hidden, *args, **kwargs)
        out = full(hidden[rows].unsqueeze(0), *args, **kwargs)
        if not isinstance(out, torch.Tensor):  # an MLP returning extras (some MoE blocks): run it in full
            return full(hidden, *args, **kwargs)
        zeros = out.new_zeros(*rows.shape, out.shape[-1])
        return zeros.masked_scatter(rows.unsqueeze(-1), out)

    with forward_replaced(mlp, forward):
        yield


def shared_prefix_length(group: dict[str, torch.Tensor], overhead: int | None = None) -> int:
    """Length of the token prefix that every row of a right-padded row group starts with, when sharing it
    pays: no labelled position inside it, at least one token of every row after it, and the tokens it
    saves (``length x (rows - 1)``) above ``overhead`` (default :data:`GROUP_OVERHEAD_TOKENS`); else 0."""
    overhead = GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    ids, mask = group["input_ids"], group["attention_mask"]
    rows = ids.shape[0]
    if rows < 2:
        return 0
    shared = (ids == ids[:1]).all(0) & mask.bool().all(0) & (group["labels"] == IGNORE_INDEX).all(0)
    length = int(shared.int().cumprod(0).sum())
    length = min(length, int(mask.sum(1).min()) - 1)
    return length if length * (rows - 1) > overhead else 0


def _answer_hidden(model: nn.Module, group: dict[str, torch.Tensor], trim_last_mlp: bool = True,
                   share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states and labels at the labelled positions of one row group (with ``trim_last_mlp``,
    the last MLP runs at those positions only; with ``share_prefix``, a prefix common to all rows runs once)."""
    ids, mask, labels = group["input_ids"], group["attention_mask"], group["labels"]
    answer = labels != IGNORE_INDEX
    prefix = shared_prefix_length(group) if share_prefix else 0
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


def _softcap(model: nn.Module) -> float | None:
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None) or None


def _logits(output: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits of ``output(hidden)``, Gemma-style soft-capped when ``softcap`` is given."""
    logits = output(hidden).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def group_answer_logits(model: nn.Module, group: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and labels at the labelled positions of one row group, as (n_tokens, vocab) and (n_tokens,)."""
    hidden, labels = _answer_hidden(model, group)
    return _logits(model.get_output_embeddings(), hidden, _softcap(model)), labels


# The fused cross-entropy forms the logits one (rows x vocabulary columns) block at a time, small enough to
# stay in the processor's cache while it is reduced and multiplied back by its output weights: on 2 CPU cores,
# blocks of 2,048 columns made SmolLM2's loss and gradient about 20 % faster than 128 MB blocks of whole rows.
CE_VOCAB_CHUNK = 2048
CE_ROW_CHUNK = 2048


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` (optionally soft-capped) against ``labels``.

    One pass over blocks of the vocabulary: each block's logits are reduced at once into a running
    log-sum-exp (online softmax) and, when ``hidden`` needs a gradient, multiplied back by the block's
    output weights; the running sums are rescaled as the maximum grows, so ``d loss / d hidden``
    (softmax minus one-hot, times the output weight) is complete after the last block. Neither the full
    (tokens x vocab) logits, their log-softmax nor its zero-filled gradient is ever held.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap):
        need_grad = ctx.needs_input_grad[0]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], CE_ROW_CHUNK):
            h, y = hidden[start:start + CE_ROW_CHUNK], labels[start:start + CE_ROW_CHUNK]
            target_weight = weight[y].float()  # d logit_y / d hidden
            target = (h.float() * target_weight).sum(-1)
            if bias is not None:
                target = target + bias[y].float()
            if softcap:
                target = torch.tanh(target / softcap) * softcap
            top = h.new_full((len(y),), -torch.inf, dtype=torch.float32)
            sums = torch.zeros_like(top)
            grad = h.new_zeros(h.shape, dtype=torch.float32) if need_grad else None
            for col in range(0, weight.shape[0], CE_VOCAB_CHUNK):
                w = weight[col:col + CE_VOCAB_CHUNK]
                logits = F.linear(h, w, None if bias is None else bias[col:col + CE_VOCAB_CHUNK]).float()
                if softcap:
                    capped = torch.tanh(logits / softcap)
                    logits = capped * softcap
                block_top = logits.amax(-1)
                new_top = torch.maximum(top, block_top)
                old_scale, block_scale = (top - new_top).exp(), (block_top - new_top).exp()
                exps = logits.sub_(block_top[:, None]).exp_()  # one exponential serves the loss and the softmax
                sums = sums * old_scale + exps.sum(-1) * block_scale
                if need_grad:
                    if softcap:
                        exps.mul_(1 - capped * capped)
                    grad = grad * old_scale[:, None] + (exps.to(w.dtype) @ w).float() * block_scale[:, None]
                top = new_top
            total += (top + sums.log() - target).sum()
            if need_grad:
                one_hot = target_weight
                if softcap:
                    one_hot = one_hot * (1 - (target / softcap) ** 2)[:, None]
                grad_hidden[start:start + CE_ROW_CHUNK] = (grad / sums[:, None] - one_hot).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_output * grad_hidden).to(grad_hidden.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, output: nn.Linear, labels: torch.Tensor,
                         softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of the logits ``output(hidden)`` (Gemma-style ``softcap`` applied when given),
    without materialising the full logits; equals ``F.cross_entropy(logits, labels, reduction="sum")``."""
    bias = getattr(output, "bias", None)
    if output.weight.requires_grad or (bias is not None and bias.requires_grad):  # a trained output layer
        return F.cross_entropy(_logits(output, hidden, softcap), labels, reduction="sum")
    return _LinearCrossEntropy.apply(hidden, output.weight, bias, labels, softcap)


def group_answer_ce_sum(model: nn.Module, group: dict[str, torch.Tensor], trim_last_mlp: bool = True,
                        share_prefix: bool = True) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens of one row group."""
    hidden, labels = _answer_hidden(model, group, trim_last_mlp, share_prefix)
    return linear_cross_entropy(hidden, model.get_output_embeddings(), labels, _softcap(model))


def answer_logits(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and labels at the labelled positions of a micro-batch, as (n_tokens, vocab) and (n_tokens,).

    Only the answer positions go through the output projection, which for small models with large
    vocabularies is a sizeable share of the forward pass; rows run in trimmed groups (:func:`row_groups`).
    """
    parts = [group_answer_logits(model, group) for group in row_groups(micro_batch)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def answer_ce(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a micro-batch (its row groups' answer states go through
    the output projection together: one larger matrix product runs faster than several small ones)."""
    parts = [_answer_hidden(model, group) for group in row_groups(micro_batch)]
    hidden, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return linear_cross_entropy(hidden, model.get_output_embeddings(), labels, _softcap(model)) / len(labels)
