import json

import pytest

from imaml.cli import main


@pytest.mark.slow
def test_synthetic_command_accuracy_part(tmp_path):
    assert main(["synthetic", "--out", str(tmp_path), "--skip-compute"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    a = res["gradient_error"]
    err, steps = a["relative_error"], a["inner_steps"]
    last = len(steps) - 1
    assert err["imaml_cg20"][last] < 1e-6                      # converged inner + 20 CG: exact
    assert err["imaml_cg1"][last] > err["imaml_cg2"][last] > err["imaml_cg5"][last] > err["imaml_cg20"][last]
    assert 1e-4 < err["imaml_cg2"][last] < 0.2                  # small, non-zero terminal error
    assert err["fomaml"][last] > 0.1 and abs(err["fomaml"][last] - err["fomaml"][last - 3]) < 1e-3  # floor
    assert err["maml"][0] > err["maml"][5] > err["maml"][9] and err["maml"][last] < 1e-10
    assert (tmp_path / "gradient_error.png").stat().st_size > 1000


def test_an_interrupted_part_b_keeps_part_a(tmp_path, monkeypatch):
    from imaml import synthetic
    fake = {"lam": 2.0, "inner_steps": [1, 2], "relative_error": {"maml": [0.1, 0.01]}}
    monkeypatch.setattr(synthetic, "gradient_error_study", lambda: fake)

    def interrupted(**kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "compute_memory_study", interrupted)
    assert main(["synthetic", "--out", str(tmp_path)]) == 130
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["gradient_error"] == fake and "compute_memory" not in res
    assert (tmp_path / "gradient_error.png").exists()
