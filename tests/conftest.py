import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spd_matrix(n, cond=50.0, seed=0, dtype=torch.float64):
    """A random symmetric positive-definite matrix with the given condition number."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=dtype)
    return q @ torch.diag(eig) @ q.T
