"""`python -m bench.heldout OUT_DIR [--tasks match,vqa] [--seed N] [--sizes 400,100,100]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.heldout import DEFAULT_SIZES, SPLITS, TASKS, generate_all


def parse_tasks(value: str) -> list[str]:
    names = [t.strip() for t in value.replace(" ", ",").split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(bad)} (known: {', '.join(TASKS)})")
    return names


def parse_sizes(value: str) -> dict[str, int]:
    parts = [int(x) for x in value.split(",")]
    if len(parts) != 3 or min(parts) < 2:
        raise argparse.ArgumentTypeError("--sizes takes TRAIN,DEV,TEST (each >= 2)")
    return dict(zip(SPLITS, parts))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.heldout", description=(__doc__ or "") + "\n\n" +
                                "\n".join(f"  {n:11s} {t.task:9s} {t.description}" for n, t in TASKS.items()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, help="writes OUT_DIR/TASK/{train,dev,test}.jsonl and media/")
    p.add_argument("--tasks", type=parse_tasks, default=list(TASKS), help=f"comma-separated (default: all: {','.join(TASKS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=parse_sizes, default=dict(DEFAULT_SIZES),
                   help="records per split TRAIN,DEV,TEST (default 400,100,100)")
    args = p.parse_args(argv)
    generate_all(args.out_dir, args.tasks, seed=args.seed, sizes=args.sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
