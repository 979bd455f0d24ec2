import pytest
import torch
from torch import nn
from torch.func import hessian

from imaml import FunctionalModel, ProximalProblem, make_hvp, task_loss


def small_net(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def small_task(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)


def test_forward_matches_module_and_roundtrip():
    net = small_net()
    fm = FunctionalModel(net)
    x, _ = small_task()
    theta = fm.theta()
    assert theta.shape == (sum(p.numel() for p in net.parameters()),)
    assert torch.allclose(fm.forward(theta, x), net(x))
    params = fm.unflatten(theta)
    assert torch.equal(fm.flatten(params), theta)
    fm.load_(theta * 2)
    assert torch.allclose(fm.theta(), theta * 2)


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_hvp_matches_full_hessian(mode):
    fm = FunctionalModel(small_net())
    x, y = small_task()
    f = task_loss(fm, x, y)
    theta = fm.theta()
    H = hessian(f)(theta)
    v = torch.randn_like(theta)
    assert torch.allclose(make_hvp(f, theta, mode)(v), H @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["fwd-rev", "rev-rev"])
def test_hvp_conv_batchnorm_matches_finite_difference_hessian(mode):
    # torch.func.hessian returns a non-symmetric matrix for this conv + batch-norm network in
    # torch 2.13, so the reference here is a full Hessian from central differences of gradients.
    from torch.func import grad
    from imaml import conv4
    fm = FunctionalModel(conv4(1, 3, hidden=4, image_size=8).double())
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.arange(3).repeat(2)
    f = task_loss(fm, x, y)
    theta, v = fm.theta(), torch.randn(fm.num_params, dtype=torch.float64)
    g, eps, eye = grad(f), 1e-6, torch.eye(fm.num_params, dtype=torch.float64)
    H = torch.stack([(g(theta + eps * e) - g(theta - eps * e)) / (2 * eps) for e in eye], 1)
    hv = make_hvp(f, theta, mode)(v)
    assert torch.allclose(hv, H @ v, rtol=1e-5, atol=1e-6)
    assert torch.allclose(H, H.T, atol=1e-5)


def test_proximal_problem_gradient_and_hvp():
    fm = FunctionalModel(small_net())
    x, y = small_task()
    theta = fm.theta()
    prob = ProximalProblem(task_loss(fm, x, y), theta, lam=3.0)
    phi = theta + 0.1 * torch.randn_like(theta)
    g = torch.func.grad(prob.value)(phi)
    assert torch.allclose(prob.grad(phi), g)
    H = hessian(prob.value)(phi)
    v = torch.randn_like(phi)
    assert torch.allclose(prob.hvp(phi)(v), H @ v)


def test_bad_arguments():
    fm = FunctionalModel(small_net())
    with pytest.raises(ValueError, match="lam"):
        ProximalProblem(lambda p: p.sum(), fm.theta(), lam=-1.0)
    with pytest.raises(ValueError, match="flat parameter vector"):
        fm.forward(torch.zeros(5, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        fm.flatten({n: torch.zeros(1) for n in fm.names})
    with pytest.raises(ValueError, match="hvp mode"):
        make_hvp(lambda p: p.sum(), fm.theta(), "nope")
    with pytest.raises(ValueError, match="no trainable"):
        FunctionalModel(nn.ReLU())


def test_ggn_matches_dense_gauss_newton_and_is_psd():
    from torch.func import jacrev
    from imaml.functional import make_ggn
    fm = FunctionalModel(small_net())
    x, y = small_task()
    theta = fm.theta()
    J = jacrev(lambda p: fm.forward(p, x))(theta).reshape(-1, theta.numel())  # [N*C, P]
    z = fm.forward(theta, x).detach()
    Hz = hessian(lambda out: fm.loss_fn(out, y))(z).reshape(z.numel(), z.numel())
    G = J.T @ Hz @ J
    v = torch.randn_like(theta)
    ggn = make_ggn(fm, x, y, theta)
    assert torch.allclose(ggn(v), G @ v, rtol=1e-9, atol=1e-12)
    # the operator itself is symmetric and positive semi-definite, unlike the Hessian here
    U = torch.randn(20, theta.numel(), dtype=theta.dtype)
    M = torch.stack([ggn(u) for u in U]) @ U.T  # uᵢᵀ G uⱼ
    assert torch.allclose(M, M.T, atol=1e-10) and float(torch.linalg.eigvalsh(M).min()) > -1e-10
    Hq = torch.stack([make_hvp(task_loss(fm, x, y), theta)(u) for u in U]) @ U.T
    assert float(torch.linalg.eigvalsh((Hq + Hq.T) / 2).min()) < 0


def test_ggn_equals_hessian_for_linear_least_squares():
    from imaml.functional import make_ggn
    from imaml.synthetic import regression_task
    model, theta, task = regression_task(seed=3)
    v = torch.randn_like(theta)
    f = task_loss(model, task.x_support, task.y_support)
    assert torch.allclose(make_ggn(model, task.x_support, task.y_support, theta)(v),
                          make_hvp(f, theta)(v), rtol=1e-10, atol=1e-12)


def test_ggn_with_torch_mse_loss():
    # forward-over-reverse through torch.nn.functional.mse_loss raised "ZeroTensors are
    # immutable"; for a squared loss the GGN is 2/n JᵀJ, checked against a dense Jacobian
    from torch.func import jacrev
    from imaml.functional import make_ggn
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    fm = FunctionalModel(net, loss_fn=nn.functional.mse_loss)
    x = torch.randn(6, 1, dtype=torch.float64)
    y = torch.randn(6, 1, dtype=torch.float64)
    theta = fm.theta()
    J = jacrev(lambda p: fm.forward(p, x))(theta).reshape(6, -1)
    v = torch.randn_like(theta)
    assert torch.allclose(make_ggn(fm, x, y, theta)(v), (2 / 6) * J.T @ (J @ v), rtol=1e-9)


def test_batch_norm_with_running_statistics_is_refused_with_the_fix():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="'1' tracks running statistics.*track_running_stats=False"):
        FunctionalModel(net)
    FunctionalModel(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))


def test_problem_gradients_by_plain_autograd_equal_torch_func():
    """ProximalProblem takes ∇G by plain autograd where no function transform is active (with
    a graph when φ is part of one, as in MAML's unrolled steps) and by torch.func under vmap:
    the gradients, values and second derivatives of each way equal torch.func's own."""
    from torch.func import grad, grad_and_value, vmap
    fm = FunctionalModel(small_net())
    x, y = small_task()
    theta = fm.theta()
    phi = theta + 0.1 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(2),
                                    dtype=theta.dtype)
    prob = ProximalProblem(task_loss(fm, x, y), theta, 0.7)
    g_ref, f_ref = grad_and_value(prob.value)(phi)
    with torch.no_grad():  # the inner solves of iMAML, FOMAML, Reptile
        f, g = prob.value_and_grad(phi)
        assert not g.requires_grad and not f.requires_grad
    assert torch.allclose(g, g_ref, rtol=1e-12, atol=1e-14) and torch.allclose(f, f_ref, rtol=1e-12)
    # with a graph (MAML): d/dθ of u·∇G(φ(θ)) for φ = θ + const, against torch.func's
    u = torch.randn(theta.shape, generator=torch.Generator().manual_seed(3), dtype=theta.dtype)

    def second(th, via_func):
        p = ProximalProblem(task_loss(fm, x, y), th, 0.7)
        start = th + (phi - theta)
        return torch.dot(u, grad(p.value)(start) if via_func else p.grad(start))

    th = theta.clone().requires_grad_(True)
    (ours,) = torch.autograd.grad(second(th, False), th)
    assert torch.allclose(ours, grad(lambda t: second(t, True))(theta), rtol=1e-10, atol=1e-13)
    # under vmap the torch.func path: the same gradients task by task
    phis = torch.stack([phi, phi * 0.5])
    assert torch.allclose(vmap(prob.grad)(phis)[0], g_ref, rtol=1e-12, atol=1e-14)
