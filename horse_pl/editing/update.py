"""Turning residuals into parameter shifts, and the gradient of a loss on the shifts back onto them.

Two pluggable stages:

- :class:`ClosedFormUpdate` (MALMEN/HORSE): residual ``r = -lr <k, k~> g~``; ridge least squares
  ``S = K^T K + exp(lambda) I``, ``dW = S^-1 K^T R~`` by a Cholesky solve. Given ``G_W = dL/d(dW)``,
  ``dL/dR~ = K S^-1 G_W`` and ``dL/dlambda = -exp(lambda) <S^-1 G_W, dW>``. With fewer key rows N than
  key features d (one process), the same quantities come from the N x N kernel matrix
  ``M = K K^T + exp(lambda) I`` (``S^-1 K^T = K^T M^-1``): ``dW = K^T M^-1 R~``, ``dL/dR~ = M^-1 K G_W``,
  ``dL/dlambda = -exp(lambda) <M^-1 K G_W, M^-1 R~>``, cheaper and better conditioned in fp32.
  Two named options for editing many facts at once: ``preserve`` adds ``mu C0`` to ``S`` (``C0`` the
  second moment of the module's keys on unrelated text, :mod:`horse_pl.editing.key_stats`; MEMIT's
  preservation term), so the solve also keeps the module's outputs on those keys; ``ridge_per_row``
  adds ``c N`` to the ridge (N = key rows), a ridge that grows with the number of edits. Neither
  changes the gradient's form: ``S`` does not depend on the residuals.
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

    needs_key_moments = False

    def init_args(self) -> dict:
        """The constructor arguments (saved with exported editors)."""
        return {}

    def factor(self, update_keys, log_lambda, all_reduce: AllReduce = _identity, key_moments=None):
        """Whatever the solve needs that both ``param_shift`` and ``shift_grads`` of one step share (or None)."""
        return None

    def param_shift(self, update_keys, residuals, log_lambda, all_reduce: AllReduce = _identity,
                    factor=None) -> torch.Tensor:
        raise NotImplementedError

    def shift_grads(self, update_keys, residuals, log_lambda, shift, shift_grad,
                    all_reduce: AllReduce = _identity, factor=None) -> ShiftGrads:
        raise NotImplementedError


@dataclass
class RidgeFactor:
    """Cholesky factor of ``S = K^T K + ridge I (+ mu C0)`` (d x d) or, when ``kernel``, of the kernel matrix
    ``M = K K^T + ridge I`` (N x N)."""

    chol: torch.Tensor
    kernel: bool


class ClosedFormUpdate(ParamShiftUpdate):
    """Ridge least-squares update ``dW = (K^T K + exp(lambda) I)^-1 K^T R~`` (MALMEN, HORSE).

    Args:
        form: ``auto`` solves with the N x N kernel matrix when there are fewer key rows than key features
            and the rows are all in one process, else with the d x d matrix ``S``; ``primal`` always uses
            ``S``, ``kernel`` the kernel matrix (one process only). Every form gives the same shifts and gradients.
        preserve: weight ``mu`` of the preservation term ``mu C0`` (0: none); ``C0`` is a mean over tokens, so
            ``mu`` counts how many tokens of unrelated text the solve keeps unchanged beside the edits. Needs the
            key moments (``key_moments``), and the d x d form.
        ridge_per_row: ``c`` of an extra ridge ``c N`` that grows with the number of key rows ``N``.
    """

    name = "closed_form"
    uses_lambda = True

    def __init__(self, form: str = "auto", preserve: float = 0.0, ridge_per_row: float = 0.0):
        if form not in ("auto", "primal", "kernel"):
            raise ValueError(f"ClosedFormUpdate form must be 'auto', 'primal' or 'kernel', not '{form}'.")
        if preserve < 0 or ridge_per_row < 0:
            raise ValueError(f"ClosedFormUpdate preserve ({preserve}) and ridge_per_row ({ridge_per_row}) must be "
                             "at least 0.")
        if preserve and form == "kernel":
            raise ValueError("ClosedFormUpdate(preserve > 0) needs form 'auto' or 'primal': the preservation term is "
                             "a d x d matrix that the kernel form cannot hold.")
        self.form, self.preserve, self.ridge_per_row = form, preserve, ridge_per_row

    @property
    def needs_key_moments(self) -> bool:
        return self.preserve > 0

    def init_args(self) -> dict:
        """The constructor arguments (saved with exported editors)."""
        return {"form": self.form, "preserve": self.preserve, "ridge_per_row": self.ridge_per_row}

    def residuals(self, keys, pseudo_keys, pseudo_grads, lr):
        return keys, -lr * (keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_grads

    def factor(self, update_keys, log_lambda, all_reduce=_identity, key_moments=None) -> RidgeFactor:
        """Cholesky factor of ``S`` (``K^T K`` summed across processes) or of the kernel matrix ``M``."""
        keys = _f(update_keys)
        one_process = all_reduce is _identity
        kernel = self.form == "kernel" or (self.form == "auto" and one_process and not self.preserve
                                           and keys.shape[0] < keys.shape[1])
        if kernel and not one_process:
            raise ValueError("ClosedFormUpdate(form='kernel') needs all key rows in one process; use form='auto' "
                             "or 'primal' under DDP.")
        gram = keys @ keys.T if kernel else all_reduce(keys.T @ keys)
        ridge = torch.exp(log_lambda.detach().to(keys.dtype))
        if self.ridge_per_row:
            rows = all_reduce(torch.tensor(float(keys.shape[0]), dtype=keys.dtype, device=keys.device))
            ridge = ridge + self.ridge_per_row * rows
        gram.diagonal().add_(ridge)
        if self.preserve:
            if key_moments is None:
                raise ValueError("ClosedFormUpdate(preserve > 0) needs the edit modules' key moments; build the "
                                 "editor through EditorModule or KnowledgeEditor, which compute them.")
            gram = gram + self.preserve * _f(key_moments)
        return RidgeFactor(torch.linalg.cholesky(gram), kernel)

    def param_shift(self, update_keys, residuals, log_lambda, all_reduce=_identity, factor=None):
        factor = factor if factor is not None else self.factor(update_keys, log_lambda, all_reduce)
        if factor.kernel:
            return _f(update_keys).T @ torch.cholesky_solve(_f(residuals), factor.chol)
        rhs = all_reduce(_f(update_keys).T @ _f(residuals))
        return torch.cholesky_solve(rhs, factor.chol)

    def shift_grads(self, update_keys, residuals, log_lambda, shift, shift_grad, all_reduce=_identity, factor=None):
        factor = factor if factor is not None else self.factor(update_keys, log_lambda, all_reduce)
        lam = torch.exp(log_lambda.detach())
        if factor.kernel:
            d_residuals = torch.cholesky_solve(_f(update_keys) @ _f(shift_grad), factor.chol)  # M^-1 K G_W
            d_lambda = -lam * (d_residuals * torch.cholesky_solve(_f(residuals), factor.chol)).sum()
        else:
            solved = torch.cholesky_solve(_f(shift_grad), factor.chol)  # S^-1 G_W
            d_residuals = _f(update_keys) @ solved
            d_lambda = -lam * (solved * shift).sum()
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
