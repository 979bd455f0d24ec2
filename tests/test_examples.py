"""The examples run as tests: each asserts what its docstring claims."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def test_sinusoid_imaml_learns_to_regress():
    import sinusoid
    before, after = sinusoid.run(outer_steps=800, log=lambda m: None)
    assert before.metric == after.metric == "loss" and before.num_tasks == after.num_tasks == 100
    assert before.accuracies == [] and len(after.losses) == 100
    # meta-training cuts the post-adaptation query MSE on held-out tasks below a quarter
    assert after.mean < 0.25 * before.mean


def test_learned_lambda_example_moves_lambda_and_learns():
    import learned_lambda
    mse, lams = learned_lambda.run(outer_steps=60, log=lambda m: None)
    fixed_mse, fixed = learned_lambda.run(outer_steps=60, learn=False, log=lambda m: None)
    assert set(fixed.values()) == {1.0}  # not learned: stays at its start
    assert len(set(round(v, 6) for v in lams.values())) > 1  # learned: per tensor, apart
    assert mse < 3.0 and fixed_mse < 3.0  # both learn (about 3.5 before meta-training)
