"""Wall time of the README's main job (`bash scripts/main.sh`), idle and beside a busy process.

Clones the checkout's HEAD into a fresh folder, times its set-up (`scripts/setup.sh`), then runs the main job once idle and once beside each busy neighbour
(`python3 -c "while True: pass"` at the nice levels given), one after another, and prints a
table: wall seconds, the ratio to the idle run, the median seconds per meta-iteration the job's
progress lines report, the fraction of inner solves within tolerance on its last progress line
and on the meta-test, and the meta-test accuracy. Writes the table as JSON.

    python benchmarks/main_job.py --out docs/benchmarks/main_job      # about 12 minutes

Time it on an otherwise idle machine: every run here is meant to be the only other load.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_main(clone: Path, label: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/main.sh"], cwd=clone, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"{label}: scripts/main.sh failed ({proc.returncode}):\n{text[-3000:]}")
    s_it = [float(x) for x in re.findall(r"([\d.]+) s/it", text)]
    conv = re.findall(r"\((\d+)% converged\)", text)
    test = re.search(r"meta-test accuracy of the best model: ([\d.]+)% ± ([\d.]+)%", text)
    met = re.search(r"tolerance met on ([\d.]+)%", text)
    return {"label": label, "wall_s": round(wall, 1),
            "median_s_per_it": statistics.median(s_it) if s_it else None,
            "last_progress_converged_pct": int(conv[-1]) if conv else None,
            "test_accuracy_pct": float(test.group(1)) if test else None,
            "test_ci95_pct": float(test.group(2)) if test else None,
            "test_inner_within_tol_pct": float(met.group(1)) if met else None,
            "tail": text.strip().splitlines()[-4:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nice", type=int, nargs="*", default=[0, 10],
                    help="nice levels of the busy neighbour, one run each (default 0 10)")
    ap.add_argument("--out", default=None, help="write OUT.json with the table")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="imaml-main-job-") as tmp:
        clone = Path(tmp) / "imaml"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        if not os.environ.get("IMAML_DATA") and (ROOT.parent / "shared" / "data").is_dir():
            os.environ["IMAML_DATA"] = str(ROOT.parent / "shared" / "data")
        t0 = time.perf_counter()
        subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, check=True, capture_output=True)
        setup_s = round(time.perf_counter() - t0, 1)
        print(f"set-up of the fresh clone (scripts/setup.sh, idle): {setup_s} s")
        rows.append(run_main(clone, "idle"))
        for n in args.nice:
            subprocess.run(["rm", "-rf", str(clone / "runs")], check=True)
            busy = subprocess.Popen(["nice", "-n", str(n), sys.executable, "-c", "while True: pass"])
            try:
                rows.append(run_main(clone, f"beside one busy process at nice {n}"))
            finally:
                busy.kill()
                busy.wait()
    base = rows[0]["wall_s"]
    print("| main job | wall s | vs idle | median s/it | converged, last progress line | "
          "meta-test within tolerance | meta-test accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["ratio_to_idle"] = round(r["wall_s"] / base, 2)
        print(f"| {r['label']} | {r['wall_s']} | {r['ratio_to_idle']}x | {r['median_s_per_it']} | "
              f"{r['last_progress_converged_pct']}% | {r['test_inner_within_tol_pct']}% | "
              f"{r['test_accuracy_pct']} ± {r['test_ci95_pct']}% |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        info = {"torch": subprocess.run([str(ROOT / ".venv/bin/python"), "-c",
                                         "import torch; print(torch.__version__)"],
                                        capture_output=True, text=True).stdout.strip(),
                "cpus": os.cpu_count(), "setup_s": setup_s, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
        Path(args.out + ".json").write_text(json.dumps(info, indent=1))
        print(f"written: {args.out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
