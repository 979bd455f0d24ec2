"""Print a Markdown table of finished runs and copy their records into docs/runs/.

    python scripts/summarize_runs.py runs/o5w1s_imaml_gd runs/omniglot_5w1s_maml ...

For each run folder: the config, iterations, training minutes and threads (train_summary.json),
the best meta-validation accuracy and the meta-test accuracy of best.pt (final.json).
"""
import json
import shutil
import sys
from pathlib import Path

PAPER = {  # the paper's Tables 2 and 3
    ("omniglot", 5, 1): {"maml": "98.7 ± 0.4", "fomaml": "98.3 ± 0.5", "reptile": "97.68 ± 0.04",
                         "imaml-gd": "99.16 ± 0.35", "imaml-hf": "99.50 ± 0.26"},
    ("omniglot", 20, 1): {"maml": "95.8 ± 0.3", "fomaml": "89.4 ± 0.5", "reptile": "89.43 ± 0.14",
                          "imaml-gd": "94.46 ± 0.42", "imaml-hf": "96.18 ± 0.36"},
    ("miniimagenet", 5, 1): {"maml": "48.70 ± 1.84", "fomaml": "48.07 ± 1.75", "reptile": "49.97 ± 0.32",
                             "imaml-gd": "48.96 ± 1.84", "imaml-hf": "49.30 ± 1.88"},
}


def main(folders):
    print("| setting | method | meta-test accuracy (600 tasks, 95% CI) | paper | best val | "
          "meta-iterations | training time | processes x threads |")
    print("|---|---|---|---|---|---|---|---|")
    for f in map(Path, folders):
        cfg = json.loads((f / "config.json").read_text())
        summ = json.loads((f / "train_summary.json").read_text())
        final = json.loads((f / "final.json").read_text())
        key = (cfg["dataset"], cfg["ways"], cfg["shots"])
        method = cfg["method"] + (" (GGN)" if cfg.get("curvature") == "ggn" and cfg["method"].startswith("imaml") else "")
        paper = PAPER.get(key, {}).get(cfg["method"], "-")
        print(f"| {cfg['dataset']} {cfg['ways']}-way {cfg['shots']}-shot | {method} | "
              f"{100 * final['test_accuracy']:.2f} ± {100 * final['test_ci95']:.2f} | {paper} | "
              f"{100 * summ['best_val']:.2f} | {summ['iterations']} (best at {final['best_iteration']}) | "
              f"{summ['train_minutes']:.0f} min | {summ.get('processes', 1)} x {summ['threads']} |")
        dest = Path("docs/runs") / f.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "metrics.csv", "curves.png", "final.json", "train_summary.json"):
            if (f / name).exists():
                shutil.copy(f / name, dest / name)


if __name__ == "__main__":
    main(sys.argv[1:])
