"""Time to accuracy: cnnlab's default recipe on Fashion-MNIST, over several seeds.

Runs the plain command `cnnlab train --dataset fashion-mnist` (no model named: the default
recipe) once per seed and reports test accuracy, training time (the per-epoch `seconds` of
metrics.csv: optimisation steps only), the time `cnnlab train` reports ("Training took": data
loading, previews, training, validation and checkpoints), and the wall time of the
whole command (start-up, data loading, training, test evaluation, report).

    .venv/bin/python benchmarks/bench_time_to_accuracy.py              # 3 seeds, the defaults
    .venv/bin/python benchmarks/bench_time_to_accuracy.py --epochs 30  # the longer recipe
    .venv/bin/python benchmarks/bench_time_to_accuracy.py --set train.lr=0.002
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cnnlab_command, machine_line, run, spread, table

TEST_LINE = re.compile(r"Test: loss [\d.]+, accuracy ([\d.]+)")
TOOK_LINE = re.compile(r"Training took ([\d.]+)s")


def host_gflops() -> float:
    """The machine's matrix-multiply rate right now (bf16 where the CPU has bf16 in hardware,
    AMX or AVX512-BF16; else fp32).

    The cores are shared with other jobs and their speed moves 2x within an hour; this figure,
    taken before each seed, says which runs met a slow stretch."""
    import torch

    from cnnlab.benchmark import matmul_ceiling
    from cnnlab.inference import cpu_has_fast_bf16

    dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return matmul_ceiling(dtype=dtype).gflops


def one_run(seed: int, project: Path, extra: list[str]) -> dict[str, float]:
    cmd = [
        *cnnlab_command(),
        "train",
        "--dataset",
        "fashion-mnist",
        "--seed",
        str(seed),
        "--project",
        str(project),
        "--name",
        f"seed{seed}",
        "--quiet",
        *extra,
    ]
    started = time.perf_counter()
    done = run(cmd)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"cnnlab train failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    test = TEST_LINE.search(done.stdout)
    took = TOOK_LINE.search(done.stdout)
    run_dir = Path(done.stdout.strip().splitlines()[-1].removeprefix("Results saved to ").strip())
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epoch_seconds = sorted(float(r["seconds"]) for r in rows) or [float("nan")]
    return {
        "seed": seed,
        "test_accuracy": float(test.group(1)) if test else float("nan"),
        "train_seconds": sum(epoch_seconds),
        # This machine's cores are shared: one run's epochs can differ 2x, which says
        # how much of a slow run is the host rather than the recipe.
        "epoch_seconds_min": epoch_seconds[0],
        "epoch_seconds_median": epoch_seconds[len(epoch_seconds) // 2],
        "epoch_seconds_max": epoch_seconds[-1],
        "train_run_seconds": float(took.group(1)) if took else float("nan"),
        "wall_seconds": wall,
        "epochs": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="override the default recipe's epochs")
    parser.add_argument("--model", help="a preset or YAML layer list instead of the default net")
    parser.add_argument("--target", type=float, default=0.93, help="test accuracy to reach")
    parser.add_argument("--budget", type=float, default=90.0, help="training seconds allowed")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    extra = ["--epochs", str(args.epochs)] if args.epochs else []
    if args.model:
        extra += ["--model", args.model]
    if args.set:
        extra += ["--set", *args.set]
    print(machine_line())
    print("command: cnnlab train --dataset fashion-mnist --seed S " + " ".join(extra))
    results = []
    with tempfile.TemporaryDirectory(prefix="cnnlab-tta-") as tmp:
        for seed in args.seeds:
            host = host_gflops()
            r = one_run(seed, Path(tmp), extra)
            results.append(r)
            print(
                f"seed {seed}: test accuracy {r['test_accuracy']:.4f} after {r['epochs']} epochs; "
                f"training {r['train_seconds']:.1f}s ('Training took' {r['train_run_seconds']:.1f}s), "
                f"whole command {r['wall_seconds']:.1f}s; epochs {r['epoch_seconds_min']:.1f}-"
                f"{r['epoch_seconds_max']:.1f}s (median {r['epoch_seconds_median']:.1f}s); "
                f"host matmul {host:,.0f} GFLOP/s before it",
                flush=True,
            )
    acc = [r["test_accuracy"] for r in results]
    train = [r["train_seconds"] for r in results]
    print()
    print(
        table(
            ["figure", "mean ± std (min-max)"],
            [
                ["test accuracy", spread(acc)],
                ["training seconds (steps)", spread(train)],
                [
                    '"Training took" seconds (data, validation, checkpoints too)',
                    spread([r["train_run_seconds"] for r in results]),
                ],
                ["whole command seconds", spread([r["wall_seconds"] for r in results])],
            ],
        )
    )
    mean_acc, mean_train = sum(acc) / len(acc), sum(train) / len(train)
    verdict = "met" if mean_acc >= args.target and mean_train <= args.budget else "NOT met"
    print(
        f"\ntarget {args.target:.1%} mean test accuracy within {args.budget:.0f}s of training: "
        f"{verdict} ({mean_acc:.2%} in {mean_train:.1f}s)"
    )


if __name__ == "__main__":
    main()
