"""The ``imaml`` command line."""
from __future__ import annotations

import argparse
import errno
import sys


def _synthetic(args) -> int:
    if args.table1:  # issue 27: Table 1 against the condition number (imaml.table1)
        from . import table1
        table1.run(args.out)
        return 0
    from .synthetic import run
    run(args.out, skip_compute=args.skip_compute, reps=args.reps)
    return 0


def overridden_method(mm, changes):
    """The method of a loaded ``MetaModel`` with some settings changed (``imaml eval``'s
    --inner-steps, --inner-lr, --lam), keeping what training carried into adaptation: the
    learned λ (unless λ is given) and Adam's carried moments."""
    from .checkpoint import build_method
    state = mm.trained_state()
    if "lam" in changes:
        state = state._replace(lam=None)
    return state.apply(build_method({**mm.info["method"], **changes}))


def _eval(args) -> int:
    from pathlib import Path

    from .checkpoint import MetaModel
    from .profiling import keep_freed_memory
    keep_freed_memory()  # as in train: large tensors reused, not faulted in afresh
    from .records import write_json_atomic
    from .data import TaskSampler, load_split
    from .evaluate import MIN_TEST_TASKS, evaluate

    from .distributed import resolve_device
    if args.out and Path(args.out).is_dir():  # found before the evaluation, not after it
        raise ValueError(f"--out {args.out} is a folder; name the JSON file to write")
    mm = MetaModel.load(args.checkpoint, resolve_device(args.device))
    info = mm.info
    method_cfg = info["method"]
    changes = {}
    if args.inner_steps is not None:
        if args.inner_steps < 1:
            raise ValueError(f"--inner-steps must be at least 1, got {args.inner_steps}")
        changes["inner_steps"] = args.inner_steps
    if args.inner_lr is not None:
        changes["inner_lr"] = args.inner_lr
    if args.lam is not None:
        if not str(method_cfg.get("name", "")).startswith("imaml"):
            raise ValueError(f"--lam is iMAML's proximal λ; this checkpoint's method is {method_cfg.get('name')}")
        changes["lam"] = args.lam
    if changes:  # the method checks the values; the message names the flags
        method_cfg = {**method_cfg, **changes}  # (what --out records)
        try:
            mm.method = overridden_method(mm, changes)
        except ValueError as e:
            flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changes.items())
            raise ValueError(f"{flags}: {e}") from None
    ways = info["ways"] if args.ways is None else args.ways
    if ways != info["ways"]:
        raise ValueError(f"the checkpoint's network is {info['ways']}-way; it cannot be "
                         f"evaluated on {ways}-way tasks")
    shots = info["shots"] if args.shots is None else args.shots
    queries = info["queries"] if args.queries is None else args.queries
    kw = {"download_missing": True} if args.download and info["dataset"] == "omniglot" else {}
    classes = load_split(info["dataset"], args.split, args.data_dir, **kw)
    sampler = TaskSampler(classes, ways, shots, queries, seed=args.seed)
    if args.split == "meta_test" and args.tasks < MIN_TEST_TASKS:
        print(f"note: {args.tasks} tasks is below the protocol's {MIN_TEST_TASKS}", file=sys.stderr)
    res = evaluate(mm.method, mm.model, mm.model.theta(), sampler, num_tasks=args.tasks)
    print(f"{info['dataset']} {ways}-way {shots}-shot, {info['method']['name']}, {args.split}: {res}")
    if res.inner_end:
        print(res.inner_summary())
        if res.inner_warning:
            print(res.inner_warning, file=sys.stderr)
    if args.out:
        write_json_atomic({"checkpoint": str(args.checkpoint), "dataset": info["dataset"],
                           "ways": ways, "shots": shots, "queries": queries, "split": args.split,
                           "seed": args.seed, "method": method_cfg, "metric": res.metric,
                           "mean": res.mean, "ci95": res.ci95, "query_loss": res.loss,
                           "num_tasks": res.num_tasks, "inner_grad_norm": res.inner_grad_norm,
                           "inner_grew": res.inner_grew, "inner_converged": res.inner_converged},
                          args.out)
    return 0


def _train(args) -> int:
    from .profiling import keep_freed_memory
    from .train import load_config, task_sampler, test_best, train
    keep_freed_memory()  # large tensors reused, not faulted in afresh (imaml.profiling)
    if args.config and "=" in args.config and not args.config.endswith(".json"):
        args.overrides, args.config = [args.config] + args.overrides, None
    if args.resume and not args.config and args.out:
        from pathlib import Path
        own = Path(args.out) / "config.json"
        if own.is_file():  # the run's own config, the overrides on top (not the defaults)
            args.config = str(own)
            print(f"resuming with the run's own config {own}")
    cfg = load_config(args.config, args.overrides)
    out = args.out or f"runs/{cfg.dataset}-{cfg.ways}w{cfg.shots}s-{cfg.method}"
    if args.data_dir:
        cfg.data_dir = args.data_dir
    if not args.no_test:  # a meta-test split that cannot make the tasks fails now, not after training
        try:
            task_sampler(cfg, "meta_test", cfg.eval_queries, 0)
        except ValueError as e:
            raise ValueError(f"the meta-test split cannot make the final test's tasks: {e} "
                             "(or train with --no-test)") from None
    allow = [a.strip() for a in (args.allow_change or "").split(",") if a.strip()]
    if allow and not args.resume:
        raise ValueError("--allow-change applies to --resume (a changed rate for a run that "
                         "continues)")
    summary = train(cfg, out, resume=args.resume, progress_every_s=args.progress_every,
                    allow_change=allow)
    if summary.get("rank", 0) != 0:  # other ranks of a torchrun launch: rank 0 reports
        return 0
    print(f"trained {summary['iterations']} iterations in {summary['train_minutes']:.1f} min; "
          f"best meta-val accuracy {100 * summary['best_val']:.2f}%")
    if not args.no_test:
        final = test_best(cfg, out)
        print(f"meta-test accuracy of the best model: {final['result']}")
        if final["inner_summary"]:
            print(f"meta-test {final['inner_summary']}")
        if final["inner_warning"]:
            print(final["inner_warning"], file=sys.stderr)
    print(f"run folder: {out} (metrics.csv, curves.png, best.pt, last.pt)")
    return 0


def _bench(args) -> int:
    from .bench import run
    run(args.out, args.workloads.split(","), args.methods.split(","), args.steps,
        args.batch, args.reps, args.modes.split(","), threads=args.threads, mem_reps=args.mem_reps)
    return 0


def _positive_ints(text: str):
    """A comma-separated list of whole numbers >= 1 (argparse type)."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects whole numbers separated by commas, got "
                                         f"{text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    """A whole number >= 1 (argparse type)."""
    if "," in text:
        raise argparse.ArgumentTypeError(f"expects one whole number, got {text!r}")
    return _positive_ints(text)[0]


def _solver_accuracy(args) -> int:
    from .solver_study import run
    checkpoints = {}
    for item in args.checkpoint:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--checkpoint expects NAME=PATH, got {item!r}")
        if label in checkpoints:
            raise ValueError(f"--checkpoint label {label!r} is given twice ({checkpoints[label]} "
                             f"and {path}); give each checkpoint its own NAME")
        checkpoints[label] = path
    if args.tasks < 1:
        raise ValueError(f"--tasks must be at least 1, got {args.tasks}")
    print(run(args.out, checkpoints, args.data_dir, args.tasks))
    print(f"written: {args.out}/solver_accuracy.json, .md, .png")
    return 0


def _time_to_accuracy(args) -> int:
    from .time_to_accuracy import run
    thresholds = tuple(t / 100 for t in args.thresholds)
    if not all(0 < t <= 1 for t in thresholds):
        raise ValueError(f"--thresholds are percentages in (0, 100], got {args.thresholds}")
    print(run(args.runs, args.out, thresholds))
    print(f"written: {args.out}/time_to_accuracy.json, .md, .png")
    return 0


def _cache(args) -> int:
    from .data.common import cache_dir, cache_files
    files, others = cache_files()  # only files carrying the cache's header are ever deleted
    if args.action == "list":
        print(f"{cache_dir()}: {len(files)} decoded dataset(s), "
              f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB")
        for f in files:
            print(f"  {f.name}  {f.stat().st_size / 2**20:.1f} MiB")
    else:
        keep = files[:args.keep]
        for f in files[args.keep:]:
            f.unlink()
        print(f"removed {len(files) - len(keep)} of {len(files)} decoded dataset(s) from "
              f"{cache_dir()} (kept the {len(keep)} newest); they are rebuilt when next needed")
    if others:
        print(f"left alone: {len(others)} other file(s) or folder(s) the cache did not write "
              f"({', '.join(p.name for p in others[:5])}{', ...' if len(others) > 5 else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imaml", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthetic", help="the paper's synthetic study: meta-gradient accuracy "
                       "against a closed form, and compute/memory against inner steps")
    s.add_argument("--out", required=True, help="output directory (results.json and PNG plots)")
    s.add_argument("--skip-compute", action="store_true",
                   help="only part (a), the accuracy study (seconds instead of minutes)")
    s.add_argument("--reps", type=_positive_int, default=3, help="timed repetitions per figure (median)")
    s.add_argument("--table1", action="store_true", help="instead: the paper's Table 1 measured "
                   "against the condition number κ (compute, memory, error; table1.json/.md/.png)")
    s.set_defaults(fn=_synthetic)

    t = sub.add_parser("train", help="meta-train (Algorithm 1) from a config file")
    t.add_argument("config", nargs="?", help="a JSON config (see configs/); omitted: the defaults")
    t.add_argument("overrides", nargs="*", metavar="field=value",
                   help="override any config field, e.g. meta_iters=500 method=maml")
    t.add_argument("--out", help="run folder (default runs/<dataset>-<N>w<K>s-<method>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--allow-change", metavar="FIELDS",
                   help="with --resume: rates that may differ from the run's config, "
                        "comma-separated (outer_lr, outer_lr_min, inner_lr, lam_lr), to continue "
                        "a run that diverged from its last good checkpoint with a lower rate")
    t.add_argument("--data-dir", help="dataset folder (default: $IMAML_DATA)")
    t.add_argument("--no-test", action="store_true", help="skip the final meta-test evaluation")
    t.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                   help="when the output is not a terminal (a log file, torchrun): a progress "
                   "line every SECONDS of wall time instead of the bar (default 60)")
    t.set_defaults(fn=_train)

    b = sub.add_parser("bench", help="time and peak memory of meta-gradients against inner "
                       "steps (one fresh process per figure)")
    b.add_argument("--out", default="results/bench", help="folder for bench.json/.md/.png; "
                   "run again into the same folder, only missing figures are measured")
    b.add_argument("--workloads", default="omniglot-5w1s,omniglot-20w5s,miniimagenet-5w1s")
    b.add_argument("--methods", default="imaml-gd,imaml-hf,maml")
    b.add_argument("--steps", default=[5, 10, 25, 50, 100], type=_positive_ints,
                   help="inner steps K, comma-separated (default 5,10,25,50,100)")
    b.add_argument("--modes", default="task,loop,vmap",
                   help="task: one task; loop / vmap: a meta-batch task by task / vmapped")
    b.add_argument("--batch", type=_positive_int, help="tasks in a meta-batch (default: 16 for "
                   "omniglot-5w1s, 4 for the larger workloads)")
    b.add_argument("--reps", type=_positive_int, default=3, help="timed repetitions of one task (median); "
                   "a meta-batch is timed once")
    b.add_argument("--mem-reps", type=_positive_int, default=3, help="fresh processes per memory figure of "
                   "one task (median); a meta-batch's memory is taken once")
    b.add_argument("--threads", type=_positive_int, help="torch threads in each measuring process")
    b.set_defaults(fn=_bench)

    e = sub.add_parser("eval", help="adapt a meta-trained checkpoint on test tasks and report "
                       "the mean accuracy with its 95%% confidence interval")
    e.add_argument("checkpoint", help="a checkpoint written by imaml train")
    e.add_argument("--data-dir", help="dataset folder (default: $IMAML_DATA)")
    e.add_argument("--download", action="store_true",
                   help="fetch Omniglot into --data-dir if it is not there")
    e.add_argument("--split", default="meta_test", choices=["meta_train", "meta_val", "meta_test"])
    e.add_argument("--tasks", type=_positive_int, default=600,
                   help="number of tasks (at least 600 for test)")
    e.add_argument("--device", default="auto", help="auto (the GPU when CUDA is available), "
                   "cpu, cuda or cuda:N (default auto)")
    e.add_argument("--seed", type=int, default=0,
                   help="task seed: the same seed gives every method the same tasks")
    e.add_argument("--ways", type=_positive_int, help="default: the checkpoint's")
    e.add_argument("--shots", type=_positive_int, help="default: the checkpoint's")
    e.add_argument("--queries", type=_positive_int, help="default: the checkpoint's")
    e.add_argument("--inner-steps", type=int, help="inner steps of the adaptation (default: the "
                   "checkpoint's); choose it on --split meta_val, never on meta_test")
    e.add_argument("--inner-lr", type=float, help="inner step size of the adaptation (default: "
                   "the checkpoint's); choose it on --split meta_val")
    e.add_argument("--lam", type=float, help="iMAML only: the proximal λ of the adaptation "
                   "(default: the checkpoint's); choose it on --split meta_val")
    e.add_argument("--out", help="also write the result as JSON here")
    e.set_defaults(fn=_eval)

    a = sub.add_parser("solver-accuracy", help="relative error of the meta-gradient's linear "
                       "solve (CG, MINRES, Gauss-Newton, normal equations, the official "
                       "operator) against a float64 reference, on meta-validation tasks")
    a.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="a checkpoint and its label in the table; repeat (early, middle, final)")
    a.add_argument("--tasks", type=int, default=10, help="meta-validation tasks per checkpoint")
    a.add_argument("--data-dir", help="dataset folder (default: $IMAML_DATA)")
    a.add_argument("--out", default="results/solver_accuracy", help="output folder")
    a.set_defaults(fn=_solver_accuracy)

    w = sub.add_parser("time-to-accuracy", help="meta-validation accuracy against training "
                       "wall time for run folders of one setting, and the minutes each needed "
                       "to reach 95, 97 and 98%% (or --thresholds)")
    w.add_argument("runs", nargs="+", help="run folders (config.json and metrics.csv[.gz])")
    w.add_argument("--out", default="results/time_to_accuracy", help="output folder")
    w.add_argument("--thresholds", type=float, nargs="+", default=[95.0, 97.0, 98.0],
                   metavar="PERCENT", help="accuracies to time, in percent (default 95 97 98; "
                   "20-way: 80 85 90)")
    w.set_defaults(fn=_time_to_accuracy)

    c = sub.add_parser("cache", help="list or prune the decoded datasets cached in $IMAML_CACHE "
                       "(default ~/.cache/imaml); a pruned one is rebuilt when next needed")
    c.add_argument("action", choices=["list", "prune"])
    c.add_argument("--keep", type=_non_negative, default=0,
                   help="prune: keep this many of the most recently written (default 0)")
    c.set_defaults(fn=_cache)
    return p


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .functional import NonFiniteError
    from .linear import NegativeCurvatureError
    try:
        return args.fn(args)
    except (DataError, CheckpointError, ValueError, NonFiniteError, NegativeCurvatureError) as e:
        print(f"imaml {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's fault, not a bug: full disk, no permission, ...
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                           errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST):
            raise
        resume = (" (with --resume, the training continues from its last checkpoint)"
                  if args.command == "train" and e.errno in (errno.ENOSPC, errno.EDQUOT)
                  else "")
        print(f"imaml {args.command}: error: {e.strerror if e.filename is None else e}{resume}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .distributed import peer_failure
        if peer_failure(e):  # under torchrun: another rank ended; its own message says why
            import torch.distributed as dist
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            print(f"imaml {args.command}: error: rank {dist.get_rank()} stops: another process "
                  f"of this torchrun run ended (its own message, if it printed one, says why; "
                  f"a process killed, e.g. for lack of memory, prints none)"
                  + (". The records are whole: continue with --resume" if args.command == "train"
                     else "") + f". ({first})", file=sys.stderr)
            return 2
        import traceback
        traceback.print_exc()
        print(f"imaml {args.command}: an unexpected internal error (traceback above); please "
              "report it as a bug, with the command that caused it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
