"""Inner-settings probe on the 2-hour run's best.pt (RESULTS.md): meta-val accuracy and the
mean ||grad G|| after adapting with other (lam, inner lr, steps); the same 100 meta-val tasks
for every setting. Run from the repository root with IMAML_DATA set:
python scripts/probe_inner.py"""
import torch
from imaml.checkpoint import MetaModel
from imaml.registry import build_method
from imaml.evaluate import evaluate
from imaml.train import load_config, task_sampler
torch.set_num_threads(1)
mm = MetaModel.load("runs/o5w1s_imaml_gd_cpu2h/best.pt")
cfg = load_config("configs/omniglot_5w1s_imaml_gd_cpu2h.json", [])
s = task_sampler(cfg, "meta_val", 5, cfg.seed + 1, lambda m: None)
theta = mm.model.theta()
for lam, lr, steps in [(2, .1, 16), (2, .1, 32), (2, .2, 8), (2, .2, 16), (2, .3, 5), (2, .4, 3), (2, .4, 5), (1, .1, 16), (1, .2, 16), (.5, .2, 16), (2, .4, 1)]:
    m = build_method({"name": "imaml-gd", "lam": lam, "inner_lr": lr, "inner_steps": steps})
    res = evaluate(m, mm.model, theta, s, num_tasks=100, progress=False)
    print(f"lam {lam} lr {lr} steps {steps}: val acc {100 * res.mean:.2f}%  mean |gradG| "
          f"{res.inner_grad_norm:.3f}  grew on {res.inner_grew} of 100 tasks", flush=True)
