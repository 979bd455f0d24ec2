import os
from pathlib import Path

import pytest
import torch

# Tests that need the real datasets find them through $IMAML_DATA, as a user would.
DATA = os.environ.get("IMAML_DATA")
HAVE_OMNIGLOT = bool(DATA) and any((Path(DATA) / p).exists() for p in
                                   ("omniglot/images_background.zip", "images_background.zip"))
needs_omniglot = pytest.mark.skipif(not HAVE_OMNIGLOT, reason="Omniglot not found: set IMAML_DATA "
                                    "to a folder holding omniglot/images_{background,evaluation}.zip")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spd_matrix(n, cond=50.0, seed=0, dtype=torch.float64):
    """A random symmetric positive-definite matrix with the given condition number."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=dtype)
    return q @ torch.diag(eig) @ q.T
