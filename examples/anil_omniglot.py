"""ANIL with implicit gradients: adapt only the head of the Omniglot Conv-4, meta-learn the body.

``adapt="13."`` (a config field, or ``FunctionalModel(module, adapt=[...])`` in the API) names
the parameters the inner problem adapts: here the final linear layer (Raghu et al. 2020, "Rapid
learning or feature reuse?"). The four convolutional blocks are meta-only: the inner solver
never moves them, and their meta-gradient is v_b − H_bh w_h, the query gradient plus how the
adapted head moves when the body changes (imaml.implicit). Everything else is the trainer of
``imaml train``: a short run on 5-way 1-shot, then meta-validation of the best model.

    IMAML_DATA=/path/to/data python examples/anil_omniglot.py     # a few minutes on 2 cores
"""
from __future__ import annotations

import tempfile

import torch

from imaml.checkpoint import MetaModel
from imaml.config import TrainConfig
from imaml.evaluate import evaluate
from imaml.train import task_sampler, train


def run(meta_iters: int = 150, meta_batch: int = 8, val_tasks: int = 100, out_dir=None,
        log=print):
    """Train ANIL-iMAML briefly; returns (meta-val EvalResult of the best model, the starting
    and the trained networks' state dicts)."""
    cfg = TrainConfig(dataset="omniglot", ways=5, shots=1, queries=5, method="imaml-gd",
                      adapt="13.", lam=2.0, inner_lr=0.1, inner_steps=10, inner_adaptive=True,
                      inner_step_rule="bb", inner_tol=0.05, cg_max_iter=5,
                      linear_solver="minres", outer_lr=3e-3, meta_batch=meta_batch,
                      meta_iters=meta_iters, val_every=meta_iters, val_tasks=val_tasks,
                      checkpoint_every=meta_iters, batching="vmap", threads=1)
    out_dir = out_dir or tempfile.mkdtemp(prefix="anil-")
    torch.manual_seed(cfg.seed)
    from imaml.registry import build_network
    start = {k: v.clone() for k, v in build_network("omniglot", 5).state_dict().items()}
    train(cfg, out_dir, progress=False, log=log)
    mm = MetaModel.load(f"{out_dir}/best.pt")
    sampler = task_sampler(cfg, "meta_val", cfg.eval_queries, 1, lambda m: None)
    res = evaluate(mm.method, mm.model, mm.model.theta(), sampler, val_tasks, progress=False)
    log(f"ANIL iMAML, {meta_iters} iterations of {meta_batch} tasks: meta-val {res}; "
        f"adapted: {', '.join(mm.model.adapted_names())}")
    return res, start, mm.network.state_dict()


if __name__ == "__main__":
    run()
