"""Command line of ``python -m bench`` (see bench/__init__.py)."""
import argparse
import os
import sys

from . import compiled, drift, fsdp, graphs, host, kernels, suite, train

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("job", nargs="?", default="suite",
                        choices=("suite", "kernels", "graphs", "train", "drift", "compiled", "fsdp", "host"))
    parser.add_argument("--preset", default="cpu", choices=("cpu", "gpu", "tiny"),
                        help="workload sizes: cpu (default), gpu (the H200 check) or tiny (tests)")
    parser.add_argument("--peers", action="store_true", help="also measure memcnn and revlib when installed")
    parser.add_argument("--steps", type=positive, default=5, help="timed steps per row (median)")
    parser.add_argument("--target", action="append", choices=tuple(compiled.TARGETS),
                        help="compiled: a GPU target to compile for (repeatable; default: all)")
    parser.add_argument("--layout", action="append", choices=tuple(compiled.LAYOUTS),
                        help="compiled: a layout of the kernels' operands (repeatable; default: all)")
    parser.add_argument("--out", default=RESULTS, help="folder for JSON, Markdown and PNG results")
    parser.add_argument("--build-only", action="store_true",
                        help="suite and graphs only: build every model and input (of the preset) for every method, "
                             "run no step, print a line each (a dry run of a GPU script on CPU); exit 1 if any fails")
    args = parser.parse_args(argv)
    if args.build_only and args.job not in ("suite", "graphs"):
        parser.error(f"--build-only goes with the suite and graphs jobs, not {args.job!r}")
    if args.build_only:
        failures = suite.build_only(args.preset, args.peers) if args.job == "suite" else graphs.build_only()
        if failures:
            sys.exit(f"python -m bench --build-only: {failures} (workload, method) failed to build")
    elif args.job == "suite":
        suite.main(args.preset, args.peers, args.out, args.steps)
    elif args.job == "kernels":
        kernels.main(args.out, tiny=args.preset == "tiny")
    elif args.job == "graphs":
        graphs.main(args.out, args.steps)
    elif args.job == "compiled":
        compiled.main(args.target or tuple(compiled.TARGETS), args.layout or tuple(compiled.LAYOUTS), args.out)
    elif args.job == "host":
        host.main(args.out, *((host.CALLS, host.ROUNDS) if args.preset != "tiny" else (5, 3)))
    elif args.job == "fsdp":
        fsdp.main(args.out, args.steps)
    elif args.job == "train":
        train.main(args.out)
    else:
        drift.main()


if __name__ == "__main__":
    main()
