"""`cnnlab bench`: the machine's matmul ceiling, then each preset's training GFLOP/s and eval images/s."""

from __future__ import annotations

import argparse
import json
from typing import Any

EXAMPLE = "cnnlab bench\n  cnnlab bench --presets fast basic --batch-size 256 --format json"


def register(command: Any) -> None:
    p = command(
        "bench",
        "measure the matmul ceiling and each preset's training GFLOP/s and eval images/s",
        cmd_bench,
    )
    p.epilog = "examples:\n  " + EXAMPLE
    p.add_argument("--presets", nargs="+", help="presets to measure (default: all)")
    p.add_argument("--input-shape", default="28,28,1", help="H,W,C, default 28,28,1")
    p.add_argument("--batch-size", type=int, default=None, help="default: the training default")
    p.add_argument("--steps", type=int, default=10, help="training steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per preset (median)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: cores)")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bf16 autocast where it is fast (CUDA, CPUs with AMX or AVX512-BF16), as training does",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from cnnlab.benchmark import bench_presets, matmul_ceiling
    from cnnlab.cli import out, parse_shape
    from cnnlab.config import TrainConfig
    from cnnlab.errors import ConfigError
    from cnnlab.inference import select_device, uses_bf16
    from cnnlab.models import list_presets, presets_that_fit
    from cnnlab.training.cores import configure_threads

    height, width, channels = parse_shape(args.input_shape)
    shape = (channels, height, width)
    presets = args.presets or presets_that_fit(shape)
    unknown = sorted(set(presets) - set(list_presets()))
    if unknown:
        raise ConfigError(
            f"Unknown preset(s) {', '.join(unknown)}; available: {', '.join(list_presets())}."
        )
    batch = args.batch_size or TrainConfig().batch_size
    if batch < 1 or args.steps < 1 or args.rounds < 1:
        raise ConfigError("--batch-size, --steps and --rounds must be positive.")
    configure_threads(args.threads)
    device = select_device(args.device)
    ceilings = [matmul_ceiling(device=device)]
    if uses_bf16(device, args.amp):
        ceilings.append(matmul_ceiling(dtype=torch.bfloat16, device=device))
    results = bench_presets(
        presets,
        input_shape=shape,
        batch_size=batch,
        steps=args.steps,
        rounds=args.rounds,
        amp=args.amp,
        device=device,
    )
    if args.format == "json":
        payload = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "ceilings": [c.__dict__ for c in ceilings],
            "presets": [
                {
                    **r.to_dict(),
                    **{f"fraction_of_{c.dtype}_ceiling": r.fraction_of(c) for c in ceilings},
                }
                for r in results
            ],
        }
        out(json.dumps(payload, indent=2))
        return 0
    out(f"Device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}.")
    for c in ceilings:
        out(f"Matrix-multiply ceiling ({c.dtype}, {c.size}x{c.size}): {c.gflops:,.1f} GFLOP/s")
    header = ["preset", "precision", "MFLOP/img", "train MFLOP/img", "train img/s", "GFLOP/s"]
    header += [f"of {c.dtype} ceiling" for c in ceilings] + ["eval img/s"]
    rows = []
    for r in results:
        row = [
            r.preset,
            r.precision,
            f"{r.forward_flops / 1e6:.2f}",
            f"{r.train_flops / 1e6:.2f}",
            f"{r.train_images_per_second:,.0f}",
            f"{r.train_gflops:.1f}",
        ]
        row += [f"{r.fraction_of(c):.0%}" for c in ceilings] + [f"{r.eval_images_per_second:,.0f}"]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for line in [header, *rows]:
        out(
            "  ".join(
                str(x).rjust(w) if i else str(x).ljust(w)
                for i, (x, w) in enumerate(zip(line, widths, strict=True))
            )
        )
    out(
        f"Batch {batch}; training FLOPs: the forward pass, plus as much again for the weight "
        "gradients of trainable layers and for the input gradients after the first trainable "
        f"layer (cnnlab summary counts them); medians of "
        f"{args.rounds} rounds of {args.steps} steps, rounds interleaved across presets."
    )
    return 0
