"""The Table 1 study (imaml.table1): exponents of compute against κ, memory, terminal errors,
and the library against the closed form and the model, on κ ∈ {10², 10⁴} at small sizes."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from imaml import table1
from imaml.functional import FunctionalModel
from imaml.inner import GradientDescent
from imaml.meta import MAML
from imaml.tasks import Task

KAPPAS = (100.0, 10000.0)
DELTA = 1e-2
D = 1024  # large enough that CG's √κ log(1/δ) steps (about 250 at κ = 10⁴) stay well below d
GD_BASED = ("maml_gd", "truncated", "imaml_gd")
ACCELERATED = ("maml_nesterov", "imaml_nesterov", "imaml_cg")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study through its entry point, small: the library runs every cell of at most 3000
    iterations (at κ = 10⁴ that leaves out the gradient-descent cells, tens of thousands of
    steps; their counts come from the model, checked against the library below)."""
    out = tmp_path_factory.mktemp("table1")
    res = table1.run(str(out), workers=1, progress=lambda *a: None, kappas=KAPPAS,
                     deltas=(DELTA,), sizes=(D,), truncations=(10, 100), few_cg=(1, 5),
                     max_library_steps=3000)
    return res, out


def rows(res, alg, kind="to_delta"):
    return {r["kappa"]: r for r in res["rows"] if r["algorithm"] == alg and r["kind"] == kind}


def test_outputs_written(study):
    res, out = study
    on_disk = json.loads((out / "table1.json").read_text())
    assert on_disk["exponents"] == res["exponents"]
    md = (out / "table1.md").read_text()
    assert "MAML through Nesterov" in md and "Terminal errors" in md
    for name in ("table1_compute.png", "table1_memory.png", "table1_terminal.png"):
        assert (out / name).stat().st_size > 5000


@pytest.mark.parametrize("alg", GD_BASED + ACCELERATED)
def test_compute_exponent(study, alg):
    """Compute to reach δ grows like κ for the gradient-descent based algorithms and like √κ for
    the accelerated ones (the paper's Table 1), within ±0.15."""
    res, _ = study
    e = res["exponents"][str(D)][alg][f"{DELTA:g}"]["compute"]
    expected = 1.0 if alg in GD_BASED else 0.5
    assert abs(e - expected) <= 0.15, (alg, e)
    cells = rows(res, alg)
    slope = math.log(cells[1e4]["compute"] / cells[1e2]["compute"]) / math.log(100)
    assert slope == pytest.approx(e, abs=1e-3)  # the fit is the two-point slope here


def test_library_reaches_delta_and_matches_model(study):
    """Every cell run through the library: its error against the closed form is at most δ at the
    model's step count, the library ran the steps it was asked for, and its meta-gradient is the
    model's to rounding."""
    res, _ = study
    ran = [r for r in res["rows"] if r.get("library")]
    assert len(ran) >= 15
    kinds = {(r["kappa"], r["algorithm"]) for r in ran}
    for alg in ACCELERATED:  # the √κ cells are run through the library at both κ
        assert {(k, alg) for k in KAPPAS} <= kinds
    for r in ran:
        lib, p = r["library"], r["params"]
        assert lib["agreement"] < 1e-9, r
        assert lib["error"] == pytest.approx(r["model_error"], rel=1e-6, abs=1e-12)
        if r["kind"] == "to_delta":
            assert lib["error"] <= r["delta"], r
        if "k" in p:
            assert lib["inner_steps"] == p["k"]
        elif p.get("inner") == "cg":
            assert lib["inner_steps"] == 1 and lib["cg_iterations"] == p["c"]
        elif "c" in p:
            assert lib["inner_steps"] == p["K"] and lib["cg_iterations"] == p["c"]
        else:
            assert lib["inner_steps"] == p["K"]


def test_counts_are_least(study):
    """One step fewer does not reach δ (MAML): the counts are the least, not just sufficient."""
    res, _ = study
    for alg in ("maml_gd", "maml_nesterov"):
        for r in rows(res, alg).values():
            assert r["model_error"] <= DELTA < r["model_error_previous"]


def test_memory_flat_for_imaml_growing_for_maml(study):
    """iMAML's autograd graph is the same at κ = 10² and 10⁴; MAML's grows with its steps."""
    res, _ = study
    for alg in ("imaml_nesterov", "imaml_cg"):
        b = {k: r["library"]["graph_bytes"] for k, r in rows(res, alg).items()}
        assert b[1e2] == b[1e4] > 0
        assert b[1e4] < 8 * 8 * D  # a handful of d-vectors
    m = rows(res, "maml_nesterov")
    steps = m[1e4]["params"]["k"] / m[1e2]["params"]["k"]
    grow = m[1e4]["library"]["graph_bytes"] / m[1e2]["library"]["graph_bytes"]
    assert steps > 5 and grow == pytest.approx(steps, rel=0.1)
    assert m[1e4]["library"]["graph_bytes"] > 100 * rows(res, "imaml_cg")[1e4]["library"]["graph_bytes"]
    gd = rows(res, "maml_gd")[1e2]
    per_step = gd["library"]["graph_bytes"] / gd["params"]["k"]
    assert per_step == pytest.approx(m[1e2]["library"]["graph_bytes"] / m[1e2]["params"]["k"], rel=0.1)
    assert per_step > 8 * D  # at least one d-vector per unrolled step


@pytest.mark.parametrize("T", [10, 100])
def test_truncated_terminal_error_above_delta(study, T):
    """Truncated back-prop cannot reach δ where its terminal error is above δ: the slowest mode
    alone keeps (1 − 1/κ)^T |g*₀|/‖g*‖ of error (its Jacobian error is (α₀/λ)(1 − m₀/L)^T with
    α₀ = λ), a lower bound of the closed form ε(T); the library's error at large K agrees."""
    res, _ = study
    term, reach = rows(res, f"truncated_T{T}", "terminal"), rows(res, f"truncated_T{T}")
    asserted = 0
    for kappa, r in term.items():
        fam = table1.Family(D, kappa)
        bound = (1 - 1 / kappa) ** T * abs(fam.g_star[0]) / fam.g_norm
        assert r["terminal_error"] >= bound * (1 - 1e-12)
        if r["terminal_error"] > DELTA:
            assert kappa not in reach  # never reaches δ, however many steps
            if r.get("library"):
                assert r["library"]["error"] > DELTA
            asserted += 1
    assert term[1e4]["terminal_error"] > DELTA and asserted >= 1
    assert term[1e2]["library"]["error"] == pytest.approx(term[1e2]["terminal_error"], rel=0.02)


def test_few_cg_steps_and_first_order_floors(study):
    res, _ = study
    for kappa in KAPPAS:
        one, five = rows(res, "imaml_cg1", "terminal")[kappa], rows(res, "imaml_cg5", "terminal")[kappa]
        assert one["terminal_error"] > five["terminal_error"] > DELTA
        fo = rows(res, "fomaml", "terminal")[kappa]
        assert fo["terminal_error"] > 1  # ‖(A/λ)g*‖/‖g*‖ ≥ α_min/λ = 1
    fo = rows(res, "fomaml", "terminal")
    assert fo[1e4]["terminal_error"] > fo[1e2]["terminal_error"]


@pytest.mark.parametrize("alg,params", [("maml_gd", {"k": 300}),
                                        ("truncated", {"K": 300, "T": 120}),
                                        ("imaml_gd", {"inner": "gd", "K": 300, "c": 40})])
def test_library_matches_model_at_1e4(alg, params):
    """At κ = 10⁴ the gradient-descent cells are from the model in the tests; on a short horizon
    the library's meta-gradients are the model's to rounding."""
    fam = table1.Family(D, 1e4)
    res = table1.run_library_cell({"d": D, "kappa": 1e4, "seed": 0, "algorithm": alg,
                                   "params": params})
    assert res["agreement"] < 1e-10
    assert res["error"] == pytest.approx(fam.rel(table1.model_g(fam, alg, params)), rel=1e-8)


def test_exponent_check_discriminates():
    """The exponent test can fail: Nesterov with no momentum is gradient descent, and its
    count grows like κ, well outside 0.5 ± 0.15 (κ = 10², 10³ to keep it short)."""
    counts = []
    for kappa in (1e2, 1e3):
        fam = table1.Family(64, kappa)
        fam.momentum = 0.0
        _, maml = table1.nesterov(fam, 6000, curve=True)
        counts.append(table1._settle(maml, DELTA))
    assert table1.fit_exponent((1e2, 1e3), counts) > 0.85


def test_closed_form_and_rotation_invariance():
    """The family's closed form against dense linear algebra on a rotated copy, and the
    library's MAML on the rotated dense problem against the diagonal one: the errors are equal,
    so taking A diagonal loses nothing."""
    d, kappa, lam = 12, 100.0, table1.LAM
    fam = table1.Family(d, kappa)
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    A = Q @ torch.diag(t(fam.alpha)) @ Q.T
    a, theta, b = Q @ t(fam.a), Q @ t(fam.theta), Q @ t(fam.b)
    M = A + lam * torch.eye(d, dtype=torch.float64)
    phi = torch.linalg.solve(M, A @ a + lam * theta)
    g_star = lam * torch.linalg.solve(M, phi - b)
    assert torch.allclose(g_star, Q @ t(fam.g_star), atol=1e-12)
    assert torch.linalg.cond(M).item() == pytest.approx(kappa, rel=1e-9)

    X = torch.diag(t(np.sqrt(fam.alpha))) @ Q.T  # ½‖Xφ − Xa‖² = ½(φ − a)ᵀA(φ − a)
    loss = lambda out, y: 0.5 * ((out.squeeze(-1) - y) ** 2).sum()  # noqa: E731
    dense = FunctionalModel(nn.Linear(d, 1, bias=False).to(torch.float64), loss_fn=loss)
    task = Task(X, X @ a, torch.eye(d, dtype=torch.float64), b)
    k = 150
    method = MAML(inner=GradientDescent(lr=fam.lr, steps=k), lam=lam)
    g_dense = method.meta_gradient(dense, theta, task).grad
    err_dense = float(torch.linalg.vector_norm(g_dense - g_star) / torch.linalg.vector_norm(g_star))
    model, th, diag_task = table1.library_problem(fam)
    g_diag = method.meta_gradient(model, th, diag_task).grad
    assert torch.allclose(g_dense, Q @ g_diag, atol=1e-11)
    assert err_dense == pytest.approx(fam.rel(table1.g_maml_gd(fam, k)), rel=1e-8)
    assert 1e-6 < err_dense < 1  # a nontrivial point of the curve


def test_cli_hook(monkeypatch, tmp_path):
    from imaml.cli import main
    seen = {}
    monkeypatch.setattr(table1, "run", lambda out, **kw: seen.setdefault("out", out))
    assert main(["synthetic", "--table1", "--out", str(tmp_path)]) == 0
    assert seen["out"] == str(tmp_path)


def test_lanczos_extremes_within_their_residual_bounds():
    """The network part's eigenvalue estimates: on a known spectrum (indefinite, like a network
    Hessian), each Ritz value lies within its residual bound of the true extreme eigenvalue."""
    h = torch.linspace(-0.5, 30.0, 3000, dtype=torch.float64)
    e = table1.lanczos_extremes(lambda v: h * v, 3000, iters=60, dtype=torch.float64)
    assert abs(e["max"] - 30.0) <= e["max_residual"] + 1e-9
    assert abs(e["min"] + 0.5) <= e["min_residual"] + 1e-9
    assert e["max_residual"] < 0.5 and e["min_residual"] < 0.5  # 2% of the spectrum's width
