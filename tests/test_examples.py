"""The examples run as tests: each asserts what its docstring claims."""
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_omniglot

pytestmark = pytest.mark.slow  # the examples train for real: 20-40 s each

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


def test_outer_regulariser_example_shortens_adaptation_and_learns():
    import outer_regulariser
    plain_mse, plain_dist = outer_regulariser.run(beta=0.0, outer_steps=100, log=lambda m: None)
    reg_mse, reg_dist = outer_regulariser.run(beta=1.0, outer_steps=100, log=lambda m: None)
    # the penalty's gradient reaches θ (directly and through φ*): adaptation travels less
    assert reg_dist < 0.8 * plain_dist  # measured 0.29 against 0.45
    assert plain_mse < 3.0 and reg_mse < 3.0  # both learn (about 3.5 before meta-training)


def test_two_input_example_learns_with_keyword_inputs():
    import two_inputs
    before, after = two_inputs.run(outer_steps=300, eval_tasks=50, log=lambda m: None)
    assert before.metric == "loss" and after.num_tasks == 50
    assert after.mean < 0.4 * before.mean  # measured 3.52 -> 0.96


@needs_omniglot
def test_anil_example_learns_and_meta_learns_the_body(tmp_path):
    import anil_omniglot
    res, start, trained = anil_omniglot.run(meta_iters=40, meta_batch=4, val_tasks=40,
                                            out_dir=str(tmp_path), log=lambda m: None)
    assert res.metric == "accuracy" and res.num_tasks == 40
    assert res.mean > 0.5  # chance is 0.2; 40 iterations of ANIL reach about ...
    # the body is meta-only: the inner loop never moves it, but the outer loop learns it
    assert not torch.equal(start["0.weight"], trained["0.weight"])
