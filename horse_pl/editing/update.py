"""Turning residuals into parameter shifts, and the gradient of a loss on the shifts back onto them.

Two pluggable stages:

- :class:`ClosedFormUpdate` (MALMEN/HORSE): residual ``r = -lr <k, k~> g~``; ridge least squares
  ``S = K^T K + exp(lambda) I``, ``dW = S^-1 K^T R~`` by a Cholesky solve. Given ``G_W = dL/d(dW)``,
  ``dL/dR~ = K S^-1 G_W`` and ``dL/dlambda = -exp(lambda) <S^-1 G_W, dW>``.
- :class:`OuterProductUpdate` (MEND): ``dW = sum_i k~_i (-lr g~_i)^T``, no solve.

Both are linear in the rows once ``S`` is fixed, which is what lets the hypernetwork be backpropagated
in row chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from horse_pl.editing.spread import AllReduce, _identity


def _f(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 caches are solved in fp32; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class ShiftGrads:
    """Gradient of ``<G_W, dW>`` w.r.t. the (spread) residuals, the update keys (MEND) and log-lambda."""

    residuals: torch.Tensor
    update_keys: torch.Tensor | None = None
    log_lambda: torch.Tensor | None = None


class ParamShiftUpdate:
    """Base class of update stages."""

    name = "base"
    uses_lambda = False

    def residuals(self, keys, pseudo_keys, pseudo_grads, lr) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (update keys, residuals) from the captured keys and the hypernetwork's outputs."""
        raise NotImplementedError

    def factor(self, update_keys, log_lambda, all_reduce: AllReduce = _identity):
        """Whatever the solve needs that both ``param_shift`` and ``shift_grads`` of one step share (or None)."""
        return None

    def param_shift(self, update_keys, residuals, log_lambda, all_reduce: AllReduce = _identity,
                    factor=None) -> torch.Tensor:
        raise NotImplementedError

    def shift_grads(self, update_keys, residuals, log_lambda, shift, shift_grad,
                    all_reduce: AllReduce = _identity, factor=None) -> ShiftGrads:
        raise NotImplementedError


class ClosedFormUpdate(ParamShiftUpdate):
    """Ridge least-squares update ``dW = (K^T K + exp(lambda) I)^-1 K^T R~`` (MALMEN, HORSE)."""

    name = "closed_form"
    uses_lambda = True

    def residuals(self, keys, pseudo_keys, pseudo_grads, lr):
        return keys, -lr * (keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_grads

    def factor(self, update_keys, log_lambda, all_reduce=_identity):
        """Cholesky factor of ``S = K^T K + exp(lambda) I`` (``K^T K`` summed across processes)."""
        keys = _f(update_keys)
        gram = all_reduce(keys.T @ keys)
        gram.diagonal().add_(torch.exp(log_lambda.detach().to(keys.dtype)))
        return torch.linalg.cholesky(gram)

    def param_shift(self, update_keys, residuals, log_lambda, all_reduce=_identity, factor=None):
        chol = factor if factor is not None else self.factor(update_keys, log_lambda, all_reduce)
        rhs = all_reduce(_f(update_keys).T @ _f(residuals))
        return torch.cholesky_solve(rhs, chol)

    def shift_grads(self, update_keys, residuals, log_lambda, shift, shift_grad, all_reduce=_identity, factor=None):
        chol = factor if factor is not None else self.factor(update_keys, log_lambda, all_reduce)
        solved = torch.cholesky_solve(_f(shift_grad), chol)  # S^-1 G_W
        d_residuals = _f(update_keys) @ solved
        d_lambda = -torch.exp(log_lambda.detach()) * (solved * shift).sum()
        return ShiftGrads(residuals=d_residuals, log_lambda=d_lambda)


class OuterProductUpdate(ParamShiftUpdate):
    """MEND's update ``dW = K~^T R`` with ``R = -lr G~`` (no solve, no lambda)."""

    name = "outer_product"

    def residuals(self, keys, pseudo_keys, pseudo_grads, lr):
        return pseudo_keys, -lr * pseudo_grads

    def param_shift(self, update_keys, residuals, log_lambda, all_reduce=_identity, factor=None):
        return all_reduce(_f(update_keys).T @ _f(residuals))

    def shift_grads(self, update_keys, residuals, log_lambda, shift, shift_grad, all_reduce=_identity, factor=None):
        g = _f(shift_grad)
        return ShiftGrads(residuals=_f(update_keys) @ g, update_keys=_f(residuals) @ g.T)
