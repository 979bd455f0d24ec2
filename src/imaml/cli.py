"""The ``imaml`` command line."""
from __future__ import annotations

import argparse
import sys


def _synthetic(args) -> int:
    from .synthetic import run
    run(args.out, skip_compute=args.skip_compute, reps=args.reps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imaml", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthetic", help="the paper's synthetic study: meta-gradient accuracy "
                       "against a closed form, and compute/memory against inner steps")
    s.add_argument("--out", required=True, help="output directory (results.json and PNG plots)")
    s.add_argument("--skip-compute", action="store_true",
                   help="only part (a), the accuracy study (seconds instead of minutes)")
    s.add_argument("--reps", type=int, default=3, help="timed repetitions per figure (median)")
    s.set_defaults(fn=_synthetic)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
