import pytest
import torch

from conftest import spd_matrix
from imaml import conjugate_gradient, dense_solve, neumann_series


def test_cg_matches_dense_solve():
    A = spd_matrix(30, cond=20.0)
    b = torch.randn(30, dtype=torch.float64)
    res = conjugate_gradient(lambda v: A @ v, b, max_iter=200, rtol=1e-12)
    exact = torch.linalg.solve(A, b)
    assert res.converged and not res.negative_curvature and not res.breakdown
    assert torch.allclose(res.x, exact, rtol=1e-9, atol=1e-10)
    assert res.residual_norms[0] == pytest.approx(float(b.norm()))
    assert res.residual_norms[-1] <= 1e-12 * float(b.norm())
    assert res.iterations == len(res.residual_norms) - 1


def test_cg_residual_is_true_residual_and_iteration_cap():
    A = spd_matrix(40, cond=1000.0)
    b = torch.randn(40, dtype=torch.float64)
    res = conjugate_gradient(lambda v: A @ v, b, max_iter=3)
    assert res.iterations == 3 and not res.converged
    assert res.residual == pytest.approx(float((b - A @ res.x).norm()), rel=1e-6)
    # CG minimises the A-norm of the error over growing Krylov spaces: it never gets worse.
    exact = torch.linalg.solve(A, b)
    errs = []
    for k in range(1, 8):
        e = conjugate_gradient(lambda v: A @ v, b, max_iter=k).x - exact
        errs.append(float(e @ A @ e))
    assert all(a >= b_ - 1e-12 for a, b_ in zip(errs, errs[1:]))


def test_cg_exact_in_n_steps_for_few_distinct_eigenvalues():
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    A = q @ torch.diag(torch.tensor([1.0] * 10 + [5.0] * 10, dtype=torch.float64)) @ q.T
    b = torch.randn(20, dtype=torch.float64)
    res = conjugate_gradient(lambda v: A @ v, b, max_iter=2)
    assert torch.allclose(res.x, torch.linalg.solve(A, b), atol=1e-10)


def test_cg_reports_negative_curvature_without_nan():
    A = torch.diag(torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    res = conjugate_gradient(lambda v: A @ v, b, max_iter=10)
    assert res.negative_curvature and not res.converged
    assert torch.isfinite(res.x).all()


def test_cg_reports_breakdown_without_nan():
    A = torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))
    calls = []

    def matvec(v):  # a matvec that produces NaN on its second call
        calls.append(1)
        return A @ v * (float("nan") if len(calls) == 2 else 1.0)

    b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    res = conjugate_gradient(matvec, b, max_iter=5)
    assert res.breakdown and res.iterations == 2 and not res.converged
    first_step = conjugate_gradient(lambda v: A @ v, b, max_iter=1).x
    assert torch.equal(res.x, first_step)


def test_cg_zero_rhs_and_bad_args():
    A = spd_matrix(5)
    res = conjugate_gradient(lambda v: A @ v, torch.zeros(5, dtype=torch.float64), max_iter=5, atol=1e-12)
    assert res.converged and res.iterations == 0 and (res.x == 0).all()
    with pytest.raises(ValueError, match="max_iter"):
        conjugate_gradient(lambda v: v, torch.ones(3), max_iter=-1)
    with pytest.raises(ValueError, match="1-D"):
        conjugate_gradient(lambda v: v, torch.ones(3, 3))
    with pytest.raises(ValueError, match="x0"):
        conjugate_gradient(lambda v: v, torch.ones(3), x0=torch.ones(4))


def test_cg_warm_start():
    A = spd_matrix(10, cond=5.0)
    b = torch.randn(10, dtype=torch.float64)
    exact = torch.linalg.solve(A, b)
    res = conjugate_gradient(lambda v: A @ v, b, x0=exact, max_iter=5, atol=1e-10)
    assert res.iterations == 0 and torch.allclose(res.x, exact)


def test_neumann_matches_dense_solve():
    A = spd_matrix(15, cond=4.0)
    b = torch.randn(15, dtype=torch.float64)
    alpha = 1.0 / float(torch.linalg.eigvalsh(A).max())
    x = neumann_series(lambda v: A @ v, b, num_terms=300, alpha=alpha)
    assert torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError):
        neumann_series(lambda v: v, b, num_terms=0)


def test_dense_solve():
    from imaml.linear import dense_matrix
    A = spd_matrix(12, cond=100.0)
    x = torch.randn(12, dtype=torch.float64)
    assert torch.equal(dense_matrix(lambda v: A @ v, 12), A)  # column i is A eᵢ
    assert torch.allclose(dense_solve(lambda v: A @ v, A @ x), x, rtol=1e-10, atol=1e-12)


def indefinite_matrix(n=30, seed=0):
    """A symmetric matrix with eigenvalues on both sides of zero (none near it)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.cat([torch.linspace(-6.0, -0.5, n // 3, dtype=torch.float64),
                     torch.linspace(0.5, 10.0, n - n // 3, dtype=torch.float64)])
    return q @ torch.diag(eig) @ q.T


def test_minres_solves_an_indefinite_system_exactly():
    from imaml import minres
    A = indefinite_matrix()
    b = torch.randn(30, dtype=torch.float64)
    res = minres(lambda v: A @ v, b, max_iter=200, rtol=1e-12)
    exact = torch.linalg.solve(A, b)
    assert res.converged and not res.breakdown and res.solver == "minres"
    assert res.negative_curvature  # a Lanczos vector with vᵀAv ≤ 0 was seen
    assert float((res.x - exact).norm() / exact.norm()) < 1e-9
    assert float((b - A @ res.x).norm()) <= 1e-11 * float(b.norm())


def test_minres_residual_is_monotone_and_true():
    from imaml import minres
    A = indefinite_matrix(seed=1)
    b = torch.randn(30, dtype=torch.float64)
    prev = float("inf")
    for k in range(1, 12):
        res = minres(lambda v: A @ v, b, max_iter=k)
        true = float((b - A @ res.x).norm())
        assert res.iterations == k and res.residual == pytest.approx(true, rel=1e-8)
        assert true <= prev + 1e-12  # MINRES minimises the residual over growing Krylov spaces
        prev = true
    # on a positive-definite system it reaches the same solution as CG
    S = spd_matrix(20, cond=30.0)
    c = torch.randn(20, dtype=torch.float64)
    m = minres(lambda v: S @ v, c, max_iter=100, rtol=1e-12)
    g = conjugate_gradient(lambda v: S @ v, c, max_iter=100, rtol=1e-12)
    assert torch.allclose(m.x, g.x, atol=1e-9) and not m.negative_curvature


def test_minres_stops_on_invariant_krylov_space_and_warm_start():
    from imaml import minres
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    A = q @ torch.diag(torch.tensor([-2.0] * 6 + [3.0] * 6, dtype=torch.float64)) @ q.T
    b = torch.randn(12, dtype=torch.float64)
    res = minres(lambda v: A @ v, b, max_iter=10, atol=1e-10)  # two eigenvalues: exact in 2 steps
    assert res.iterations == 2 and torch.allclose(res.x, torch.linalg.solve(A, b), atol=1e-10)
    exact = torch.linalg.solve(A, b)
    warm = minres(lambda v: A @ v, b, x0=exact, max_iter=5, atol=1e-9)
    assert warm.iterations == 0 and torch.allclose(warm.x, exact)


def test_cg_negative_curvature_policy():
    from imaml.linear import NegativeCurvatureError
    A = indefinite_matrix(seed=2)
    b = torch.randn(30, dtype=torch.float64)
    res = conjugate_gradient(lambda v: A @ v, b, max_iter=50)  # 'stop', the default
    assert res.negative_curvature and not res.converged and torch.isfinite(res.x).all()
    # the iterate returned is the last one before the bad direction: running exactly the
    # iterations that were accepted reproduces it
    accepted = len(res.residual_norms) - 1
    assert res.iterations == accepted + 1
    again = conjugate_gradient(lambda v: A @ v, b, max_iter=accepted)
    assert torch.equal(again.x, res.x) and not again.negative_curvature
    with pytest.raises(NegativeCurvatureError, match="negative curvature"):
        conjugate_gradient(lambda v: A @ v, b, max_iter=50, on_negative_curvature="raise")
    with pytest.raises(ValueError, match="on_negative_curvature"):
        conjugate_gradient(lambda v: A @ v, b, on_negative_curvature="ignore")


@pytest.mark.parametrize("solver", ["cg", "minres"])
def test_batched_solves_equal_single_solves(solver):
    from torch.func import vmap
    from imaml.linear import LINEAR_SOLVERS, minres
    A = spd_matrix(25, cond=100.0) if solver == "cg" else indefinite_matrix(25, seed=3)
    B = torch.randn(5, 25, dtype=torch.float64)
    B[2] = 0.0  # a system solved at once: it must stay frozen, not produce NaN
    state = vmap(lambda b: LINEAR_SOLVERS[solver](lambda v: A @ v, b, max_iter=12, rtol=1e-3,
                                                  early_stop=False))(B)
    single = conjugate_gradient if solver == "cg" else minres
    for i in range(5):
        r = single(lambda v: A @ v, B[i], max_iter=12, rtol=1e-3)
        assert torch.allclose(state.x[i], r.x, atol=1e-10) and int(state.iterations[i]) == r.iterations
        assert float(state.residual[i]) == pytest.approx(r.residual, rel=1e-8, abs=1e-12)
