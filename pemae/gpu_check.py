"""GPU check of the training engine, and the compute estimate of a full pretraining run.

    python -m pemae.gpu_check                 # one GPU: images/s, memory and MFU of the paper preset
    python -m pemae.gpu_check --smoke         # the real loops end to end under torchrun (pemae.perf.smoke)
    python -m pemae.gpu_check --estimate      # FLOPs and GPU-hours of a full run (no GPU needed)

What is measured: `pemae.perf.gpu`.
"""

from __future__ import annotations

import argparse

from pemae.config.schema import ConfigError
from pemae.perf.gpu import preset_config, compute_estimate, gpu_check
from pemae.perf.step_cost import resolve_device


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimate", action="store_true",
                        help="print the compute estimate of a full run instead of the GPU check")
    parser.add_argument("--smoke", action="store_true",
                        help="run the real loops (pretrain, resume, evaluate, fine-tune, dense) "
                        "under torchrun on a small image folder instead (pemae.perf.smoke)")
    parser.add_argument("--out", default="results/bench/gpu", help="smoke: folder for smoke.md/json")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", default="bf16", choices=("auto", "off", "bf16", "fp16"))
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak per GPU (check: looked up by GPU name; estimate: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="estimate: the MFU assumed")
    parser.add_argument("--mfu-measured", action="store_true",
                        help="estimate: --mfu was measured (by the GPU check), not assumed")
    parser.add_argument("--epochs", type=int, default=None, help="estimate: default the preset's")
    args = parser.parse_args(argv)

    if args.smoke:
        from pemae.perf.smoke import smoke

        smoke(args.out, args.device)
        return 0
    if args.estimate:
        compute_estimate(args.preset, epochs=args.epochs, mfu=args.mfu,
                         peak_tflops=args.peak_tflops or 989.0, mfu_measured=args.mfu_measured)
        return 0
    cfg = preset_config(args.preset)
    try:
        device = resolve_device(args.device, cfg)
    except ConfigError:
        print(f"--device {args.device}: no CUDA device is available here. The GPU check needs "
              "one; on the CPU run e.g. `--preset tiny --device cpu --amp off`.")
        return 2
    if device.type != "cuda" and args.preset == "paper":
        print("No CUDA device: the paper preset (ViT-B/16, 224 px) needs a GPU for this check. "
              "Run it on a GPU machine, or try `--preset tiny --device cpu --amp off` here.")
        return 2
    gpu_check(cfg, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
              device=device, amp=args.amp, peak=args.peak_tflops)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
