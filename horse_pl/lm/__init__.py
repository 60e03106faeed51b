"""Language-model passes used by capture, metrics, training and the sequential editors.

``rows`` (row groups), ``last_mlp`` (the last MLP at answer rows), ``prefix`` (a shared prefix run once),
``cross_entropy`` (the fused loss), ``passes`` (answer logits and losses built from them) and ``replay`` (frozen
lower layers computed once across optimiser steps).
"""

from horse_pl.lm.cross_entropy import linear_cross_entropy
from horse_pl.lm.passes import (
    answer_ce,
    answer_logits,
    group_answer_ce_sum,
    group_answer_logits,
    sequence_sums,
    unlanded_answer_ce,
)
from horse_pl.lm.replay import lowest_layer, replayed_below

__all__ = ["answer_ce", "answer_logits", "group_answer_ce_sum", "group_answer_logits", "linear_cross_entropy",
           "lowest_layer", "replayed_below", "sequence_sums", "unlanded_answer_ce"]
