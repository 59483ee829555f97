"""Peer benchmark: pemae's pretraining step against the libraries people would use instead.

    python -m pemae.bench                                   # sizes issue and default, on the CPU/GPU
    python -m pemae.bench --size tiny --rounds 1 --steps 1 --warmup 1 --out /tmp/bench_tiny
    python -m pemae.bench --size issue --device cuda --dtype bf16 --out results/bench
    python -m pemae.bench --size default --compile --out results/bench/compiled

What is measured, and how: `pemae.perf.benchmark`; the peers: `pemae.perf.peers`.
"""

from __future__ import annotations

import argparse

from pemae.perf.benchmark import DTYPES, SIZES, run_benchmark


def parse_sizes(values: list[str] | None) -> list[str]:
    """--size given any number of times, each a name or a comma list; default issue, default."""
    names = [n.strip() for v in (values or ["issue,default"]) for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        raise SystemExit(f"unknown --size {', '.join(unknown)}: choose from {', '.join(SIZES)}")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", help=f"{', '.join(SIZES)}; repeatable or a "
                        "comma list (default: issue,default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every implementation (FLOPs and memory stay eager)")
    parser.add_argument("--out", default="results/bench", help="folder for bench.md and bench.json")
    args = parser.parse_args(argv)
    return run_benchmark(parse_sizes(args.size), args.rounds, args.warmup, args.steps,
                         args.device, args.dtype, args.out, compile=args.compile)


if __name__ == "__main__":
    main()
