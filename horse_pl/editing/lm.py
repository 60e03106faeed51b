"""Language-model passes that compute logits only where a label is (the answer positions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from horse_pl.data.tokenize import IGNORE_INDEX


def answer_logits(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (fp32) and labels at the labelled positions of a micro-batch, as (n_tokens, vocab) and (n_tokens,).

    Only the answer positions go through the output projection, which for small models with large
    vocabularies is a sizeable share of the forward pass.
    """
    hidden = model.base_model(
        input_ids=micro_batch["input_ids"], attention_mask=micro_batch["attention_mask"], use_cache=False
    ).last_hidden_state
    mask = micro_batch["labels"] != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[mask]).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits, micro_batch["labels"][mask]


def answer_ce(model: nn.Module, micro_batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a micro-batch."""
    logits, labels = answer_logits(model, micro_batch)
    return F.cross_entropy(logits, labels)
