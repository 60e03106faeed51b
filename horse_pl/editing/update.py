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
  preservation term), so the solve also keeps the module's outputs on those keys; ``preserve_facts`` adds
  ``mu_f F``, ``F`` the second moment of the keys at the answers of known facts (other subjects' facts, the
  neighbourhood an edit must leave alone; :func:`horse_pl.editing.key_stats.fact_key_moments`); ``ridge_per_row``
  adds ``c N`` to the ridge (N = key rows), a ridge that grows with the number of edits. Neither
  changes the gradient's form: ``S`` does not depend on the residuals.
- :class:`OuterProductUpdate` (MEND): ``dW = sum_i k~_i (-lr g~_i)^T``, no solve.

Both are linear in the rows once ``S`` is fixed, which is what lets the hypernetwork be backpropagated
in row chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from horse_pl.editing.spread import AllReduce
from horse_pl.reduction import LOCAL


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
    needs_fact_moments = False

    def init_args(self) -> dict:
        """The constructor arguments (saved with exported editors)."""
        return {}

    def factor(self, update_keys, log_lambda, all_reduce: AllReduce = LOCAL, key_moments=None, fact_moments=None):
        """Whatever the solve needs that both ``param_shift`` and ``shift_grads`` of one step share (or None)."""
        return None

    def param_shift(self, update_keys, residuals, log_lambda, all_reduce: AllReduce = LOCAL,
                    factor=None) -> torch.Tensor:
        raise NotImplementedError

    def shift_grads(self, update_keys, residuals, log_lambda, shift, shift_grad,
                    all_reduce: AllReduce = LOCAL, factor=None) -> ShiftGrads:
        raise NotImplementedError

    def solve(self, update_keys: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor],
              log_lambdas: Sequence[torch.Tensor], all_reduce: AllReduce = LOCAL,
              key_moments: Sequence[torch.Tensor] | None = None,
              fact_moments: Sequence[torch.Tensor] | None = None, factors: list | None = None,
              ) -> tuple[list[torch.Tensor], list]:
        """The shifts of every edit module (fp32) and the factors their gradients reuse: one solve per module.
        ``factors`` from an earlier solve with the same keys, lambdas and moments skips factoring again (only the
        residuals changed, as in :meth:`horse_pl.editing.editor.Editor.refine`'s steps)."""
        if factors is None:
            moments = key_moments or [None] * len(update_keys)
            facts = fact_moments or [None] * len(update_keys)
            factors = [self.factor(k, lam, all_reduce, m, f)
                       for k, lam, m, f in zip(update_keys, log_lambdas, moments, facts)]
        shifts = [self.param_shift(k, r, lam, all_reduce, f)
                  for k, r, lam, f in zip(update_keys, residuals, log_lambdas, factors)]
        return shifts, factors

    def solve_grads(self, update_keys, residuals, log_lambdas, shifts, shift_grads, all_reduce=LOCAL,
                    factors=None) -> list[ShiftGrads]:
        """:meth:`shift_grads` of every edit module."""
        factors = factors or [None] * len(update_keys)
        return [self.shift_grads(k, r, lam, w, g, all_reduce, f) for k, r, lam, w, g, f
                in zip(update_keys, residuals, log_lambdas, shifts, shift_grads, factors)]

    def fit(self, update_keys, residuals, shifts) -> list[float]:
        """Per module, the share of the residuals' energy the shift reproduces on its own keys,
        ``1 - ||K dW - R~||^2 / ||R~||^2`` (1: every edit's residual is met)."""
        return [_fit_share([k], [w], r) for k, r, w in zip(update_keys, residuals, shifts)]


def _fit_share(keys, shifts, target) -> float:
    target = target.double()
    miss = sum(k.double() @ w.detach().double() for k, w in zip(keys, shifts)) - target
    return float(1 - (miss ** 2).sum() / (target ** 2).sum().clamp_min(1e-30))


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
        preserve_facts: weight ``mu_f`` of a second preservation term ``mu_f F`` (0: none), ``F`` the mean second
            moment of the keys at the answer tokens of known facts (``fact_moments``): how many answer tokens of
            other facts the solve keeps unchanged. Needs the d x d form.
    """

    name = "closed_form"
    uses_lambda = True

    def __init__(self, form: str = "auto", preserve: float = 0.0, ridge_per_row: float = 0.0,
                 preserve_facts: float = 0.0):
        if form not in ("auto", "primal", "kernel"):
            raise ValueError(f"ClosedFormUpdate form must be 'auto', 'primal' or 'kernel', not '{form}'.")
        if preserve < 0 or ridge_per_row < 0 or preserve_facts < 0:
            raise ValueError(f"ClosedFormUpdate preserve ({preserve}), ridge_per_row ({ridge_per_row}) and "
                             f"preserve_facts ({preserve_facts}) must be at least 0.")
        if (preserve or preserve_facts) and form == "kernel":
            raise ValueError("ClosedFormUpdate(preserve or preserve_facts > 0) needs form 'auto' or 'primal': the "
                             "preservation term is a d x d matrix that the kernel form cannot hold.")
        self.form, self.preserve, self.ridge_per_row = form, preserve, ridge_per_row
        self.preserve_facts = preserve_facts

    @property
    def needs_key_moments(self) -> bool:
        return self.preserve > 0

    @property
    def needs_fact_moments(self) -> bool:
        return self.preserve_facts > 0

    def init_args(self) -> dict:
        """The constructor arguments (saved with exported editors)."""
        return {"form": self.form, "preserve": self.preserve, "ridge_per_row": self.ridge_per_row,
                "preserve_facts": self.preserve_facts}

    def preservation(self, key_moments, fact_moments) -> torch.Tensor | None:
        """``mu C0 + mu_f F`` of one module (None when neither term is on); one-sentence errors for a missing one."""
        terms = []
        for weight, moments, what, option in ((self.preserve, key_moments, "key moments", "preserve"),
                                              (self.preserve_facts, fact_moments, "fact key moments",
                                               "preserve_facts")):
            if weight:
                if moments is None:
                    raise ValueError(f"{type(self).__name__}({option} > 0) needs the edit modules' {what}; build the "
                                     "editor through EditorModule or KnowledgeEditor, which compute them.")
                terms.append(weight * _f(moments))
        return sum(terms) if terms else None

    def residuals(self, keys, pseudo_keys, pseudo_grads, lr):
        return keys, -lr * (keys * pseudo_keys).sum(-1, keepdim=True) * pseudo_grads

    def factor(self, update_keys, log_lambda, all_reduce=LOCAL, key_moments=None, fact_moments=None) -> RidgeFactor:
        """Cholesky factor of ``S`` (``K^T K`` summed across processes) or of the kernel matrix ``M``."""
        keys = _f(update_keys)
        one_process = not all_reduce.is_distributed
        preservation = self.preservation(key_moments, fact_moments)
        kernel = self.form == "kernel" or (self.form == "auto" and one_process and preservation is None
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
        if preservation is not None:
            gram = gram + preservation.to(gram.dtype)
        return RidgeFactor(torch.linalg.cholesky(gram), kernel)

    def param_shift(self, update_keys, residuals, log_lambda, all_reduce=LOCAL, factor=None):
        factor = factor if factor is not None else self.factor(update_keys, log_lambda, all_reduce)
        if factor.kernel:
            return _f(update_keys).T @ torch.cholesky_solve(_f(residuals), factor.chol)
        rhs = all_reduce(_f(update_keys).T @ _f(residuals))
        return torch.cholesky_solve(rhs, factor.chol)

    def shift_grads(self, update_keys, residuals, log_lambda, shift, shift_grad, all_reduce=LOCAL, factor=None):
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


@dataclass
class JointFactor:
    """What a joint solve's backward reuses: each module's ``K_l A_l^-1`` and the Cholesky factor of ``M``."""

    keys_solved: list[torch.Tensor]
    chol: torch.Tensor


class JointClosedFormUpdate(ClosedFormUpdate):
    """One ridge least-squares solve across all edit modules: their outputs add into the same residual stream, so
    the solve fits the *sum* of the spread residuals, ``sum_l K_l dW_l = sum_l R~_l``, with every module's keys at
    once (``N`` rows against all modules' key features together, where a per-module solve has one module's).

    ``min sum_l ||dW_l||^2_{A_l} + ||sum_l K_l dW_l - R||^2`` with ``A_l = exp(lambda_l) I (+ c N I) (+ mu C0_l)``
    gives ``dW_l = A_l^-1 K_l^T a``, ``a = M^-1 R``, ``M = I + sum_l K_l A_l^-1 K_l^T`` (N x N). Given
    ``G_l = dL/d(dW_l)``: ``dL/dR~_l = M^-1 sum_j K_j A_j^-1 G_j``, the same for every module. Lambda is not learnt
    (``learn_lambda`` has no effect); all key rows must be in one process (no DDP).

    Args: ``preserve``, ``ridge_per_row`` and ``preserve_facts`` as in :class:`ClosedFormUpdate`.
    """

    name = "joint_closed_form"
    uses_lambda = False

    def __init__(self, preserve: float = 0.0, ridge_per_row: float = 0.0, preserve_facts: float = 0.0):
        super().__init__("primal", preserve, ridge_per_row, preserve_facts)

    def init_args(self) -> dict:
        return {"preserve": self.preserve, "ridge_per_row": self.ridge_per_row, "preserve_facts": self.preserve_facts}

    def factor(self, update_keys, log_lambda, all_reduce=LOCAL, key_moments=None, fact_moments=None):
        raise NotImplementedError("JointClosedFormUpdate solves all modules together: use solve().")

    def solve(self, update_keys, residuals, log_lambdas, all_reduce=LOCAL, key_moments=None, fact_moments=None,
              factors=None):
        if all_reduce.is_distributed:
            raise ValueError("JointClosedFormUpdate needs all key rows in one process; train it on one device, or "
                             "use ClosedFormUpdate under DDP.")
        if factors is not None:  # the same keys, lambdas and moments: only the residuals changed
            alpha = torch.cholesky_solve(sum(_f(r) for r in residuals), factors[0].chol)
            return [ks.T @ alpha for ks in factors[0].keys_solved], factors
        moments = key_moments or [None] * len(update_keys)
        facts = fact_moments or [None] * len(update_keys)
        preservations = [self.preservation(m, f) for m, f in zip(moments, facts)]
        keys = [_f(k) for k in update_keys]
        n_rows = keys[0].shape[0]
        kernel = torch.eye(n_rows, dtype=keys[0].dtype, device=keys[0].device)
        solved = []
        for position, k in enumerate(keys):
            ridge = torch.exp(log_lambdas[position].detach().to(k.dtype)) + self.ridge_per_row * n_rows
            a = torch.eye(k.shape[1], dtype=k.dtype, device=k.device) * ridge
            if preservations[position] is not None:
                a = a + preservations[position].to(k.dtype)
            k_solved = torch.cholesky_solve(k.T, torch.linalg.cholesky(a)).T  # K A^-1 (A symmetric)
            solved.append(k_solved)
            kernel.addmm_(k_solved, k.T)  # in place: at thousands of rows the N x N kernel is the largest matrix
        chol = torch.linalg.cholesky(kernel)
        alpha = torch.cholesky_solve(sum(_f(r) for r in residuals), chol)
        return [ks.T @ alpha for ks in solved], [JointFactor(solved, chol)]

    def solve_grads(self, update_keys, residuals, log_lambdas, shifts, shift_grads, all_reduce=LOCAL,
                    factors=None):
        factor = factors[0] if factors else self.solve(update_keys, residuals, log_lambdas, all_reduce)[1][0]
        pulled = sum(ks @ _f(g) for ks, g in zip(factor.keys_solved, shift_grads))
        d_residuals = torch.cholesky_solve(pulled, factor.chol)
        return [ShiftGrads(residuals=d_residuals) for _ in update_keys]

    def fit(self, update_keys, residuals, shifts) -> list[float]:
        """One number: the share of the summed residuals' energy that all modules' shifts reproduce together."""
        return [_fit_share(update_keys, shifts, sum(r.double() for r in residuals))]


class OuterProductUpdate(ParamShiftUpdate):
    """MEND's update ``dW = K~^T R`` with ``R = -lr G~`` (no solve, no lambda)."""

    name = "outer_product"

    def residuals(self, keys, pseudo_keys, pseudo_grads, lr):
        return pseudo_keys, -lr * pseudo_grads

    def param_shift(self, update_keys, residuals, log_lambda, all_reduce=LOCAL, factor=None):
        return all_reduce(_f(update_keys).T @ _f(residuals))

    def shift_grads(self, update_keys, residuals, log_lambda, shift, shift_grad, all_reduce=LOCAL, factor=None):
        g = _f(shift_grad)
        return ShiftGrads(residuals=_f(update_keys) @ g, update_keys=_f(residuals) @ g.T)
