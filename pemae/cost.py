"""What the teachers cost: training-step throughput and memory of MAE, PEMAE single, PEMAE dual.

    python -m pemae.cost --preset default --warmup 2 --steps 6

How it is measured: `pemae.perf.step_cost`.
"""

from __future__ import annotations

import argparse

from pemae.config.params import build_config
from pemae.perf.step_cost import measure_step_cost


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--device", default=None, help="auto, cpu or cuda (default: the config's)")
    args = parser.parse_args(argv)
    return measure_step_cost(build_config(args.preset), batch_size=args.batch_size,
                             warmup=args.warmup, steps=args.steps, device=args.device,
                             block=args.block)


if __name__ == "__main__":
    main()
