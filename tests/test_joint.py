"""The joint solve across edit modules (JointClosedFormUpdate): its shifts minimise the stated objective, and the
editor's chunked backward through it equals autograd."""

import pytest
import torch
from conftest import cubic_meta_loss, perturbed_editor, pipeline_grads

from horse_pl.editing.capture import Capture
from horse_pl.editing.update import ClosedFormUpdate, JointClosedFormUpdate
from horse_pl.reduction import distributed


def _moments(d, count, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        k0 = torch.randn(30, d, generator=g, dtype=torch.float64)
        out.append(k0.T @ k0 / 30)
    return out


def _objective(keys, shifts, target, ridges, moments, mu):
    fit = sum(k @ w for k, w in zip(keys, shifts)) - target
    norm = sum(ridge * (w ** 2).sum() + (mu * (w * (c @ w)).sum() if mu else 0.0)
               for w, ridge, c in zip(shifts, ridges, moments))
    return (fit ** 2).sum() + norm


@pytest.mark.parametrize("mu", [0.0, 7.0])
@pytest.mark.parametrize("n_rows", [20, 4], ids=["rows>features", "rows<features"])
def test_joint_solve_is_the_minimiser_of_its_objective(mu, n_rows):
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(n_rows, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    residuals = [torch.randn(n_rows, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    moments = _moments(6, 3, 4)
    log_lambdas = [torch.tensor(v, dtype=torch.float64) for v in (0.1, -0.5, 0.3)]
    per_row = 0.05
    update = JointClosedFormUpdate(preserve=mu, ridge_per_row=per_row)
    shifts, _ = update.solve(keys, residuals, log_lambdas, key_moments=moments if mu else None)
    ridges = [float(torch.exp(lam)) + per_row * n_rows for lam in log_lambdas]
    target = sum(residuals)
    params = [s.clone().requires_grad_(True) for s in shifts]
    _objective(keys, params, target, ridges, moments, mu).backward()
    for p in params:  # stationary point of a strictly convex objective: its minimiser
        torch.testing.assert_close(p.grad, torch.zeros_like(p.grad), rtol=0, atol=1e-9)
    # with a large ridge on all modules but one, the joint solve is that module's own ridge solve of the sum
    big = [torch.tensor(0.0, dtype=torch.float64)] + [torch.tensor(40.0, dtype=torch.float64)] * 2
    alone, _ = JointClosedFormUpdate().solve(keys, residuals, big)
    single = ClosedFormUpdate("primal").param_shift(keys[0], target, big[0])
    torch.testing.assert_close(alone[0], single, rtol=1e-6, atol=1e-9)
    assert update.fit(keys, residuals, shifts)[0] <= 1.0


def test_joint_solve_gradient_equals_autograd():
    g = torch.Generator().manual_seed(5)
    n, shapes = 9, ((6, 4),) * 3
    cap = Capture(keys=[torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(3)],
                  value_grads=[torch.randn(n, 4, generator=g, dtype=torch.float64) for _ in range(3)], loss=0.0)
    moments = _moments(6, 3, 6)
    targets = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    mu, per_row = 3.0, 0.1

    def make():
        return perturbed_editor(shapes, JointClosedFormUpdate(preserve=mu, ridge_per_row=per_row), moments)

    meta_loss = cubic_meta_loss(targets)

    ref = make()
    rows = [ref._residual_rows(cap, p, slice(None)) for p in range(3)]
    spread = ref.spread([r for _, r in rows], cap.value_grads)
    a_inv = [torch.linalg.inv((torch.exp(ref.hypernet.log_lambda(p)) + per_row * n) * torch.eye(6, dtype=torch.float64)
                              + mu * moments[p]) for p in range(3)]
    kernel = torch.eye(n, dtype=torch.float64) + sum(k @ a @ k.T for (k, _), a in zip(rows, a_inv))
    alpha = torch.linalg.solve(kernel, sum(spread))
    meta_loss([a @ k.T @ alpha for (k, _), a in zip(rows, a_inv)]).backward()
    expected = {name: p.grad.clone() for name, p in ref.named_parameters() if p.grad is not None}
    got = pipeline_grads(make(), cap, meta_loss)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-9, msg=name)


def test_joint_solve_refuses_ddp_and_missing_moments():
    keys, residuals, lams = [torch.randn(3, 4)] * 2, [torch.randn(3, 2)] * 2, [torch.tensor(0.0)] * 2
    with pytest.raises(ValueError, match="one process"):
        JointClosedFormUpdate().solve(keys, residuals, lams, distributed())
    with pytest.raises(ValueError, match="key moments"):
        JointClosedFormUpdate(preserve=1.0).solve(keys, residuals, lams)


@pytest.mark.parametrize("update", [JointClosedFormUpdate(preserve=3.0), ClosedFormUpdate("primal", preserve=3.0),
                                    ClosedFormUpdate("auto")], ids=["joint", "primal", "auto"])
def test_a_solve_given_its_factors_solves_new_residuals_exactly_as_from_scratch(update):
    """Refinement steps change only the residuals: the factors of the first solve serve every later one."""
    g = torch.Generator().manual_seed(5)
    keys = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    first = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    later = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    lams = [torch.tensor(v, dtype=torch.float64) for v in (0.1, -0.5, 0.3)]
    moments = _moments(6, 3, 4) if update.preserve else None
    _, factors = update.solve(keys, first, lams, key_moments=moments)
    fresh, fresh_factors = update.solve(keys, later, lams, key_moments=moments)
    reused, reused_factors = update.solve(keys, later, lams, key_moments=moments, factors=factors)
    for a, b in zip(fresh, reused):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert reused_factors is factors
