"""cnnlab against Keras 3 / TensorFlow on the tutorial nets, side by side in one run.

For each of `tiny`, `basic` and `dropout`: the same layers, the same 28x28 Fashion-MNIST split
(48,000 training images, 12,000 held out, the 10,000 test images), batch 128, Adam 1e-3, no
augmentation, the same number of epochs. Keras trains in its own venv (keras_side.py), cnnlab
in this process, alternating epoch by epoch (a Keras epoch, then a cnnlab epoch), so both see
the same machine load. cnnlab uses its defaults (bf16 autocast where the CPU has AMX or
AVX512-BF16; --no-amp for plain fp32). Epoch times are training steps only, validation excluded.

With several --seeds (each its own split, initial weights and order, the same for both sides)
the verdict takes the median speed-up and the mean accuracy gap over the seeds: one seed's test
accuracy moves by up to a point from one seed to the next in either framework, more than the
0.5-point tolerance it is judged against.

    make bench-keras                  # installs .venv-keras first; seeds 0, 1 and 2
    .venv/bin/python benchmarks/bench_keras.py --epochs 5 --keras-python .venv-keras/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line, median, table

NETS = ("tiny", "basic", "dropout")


def export_split(path: Path, seed: int) -> tuple[int, int]:
    """Write cnnlab's own split of Fashion-MNIST (val_split 0.2) for the Keras side."""
    from cnnlab.config import DataConfig
    from cnnlab.data.prepare import prepare_data

    data = prepare_data(DataConfig(dataset="fashion-mnist", val_split=0.2), seed)
    assert data.test is not None
    np.savez(
        path,
        x_train=data.train.images.numpy(),
        y_train=data.train.labels.numpy(),
        x_test=data.test.images.numpy(),
        y_test=data.test.labels.numpy(),
    )
    return len(data.train), len(data.test)


class KerasProcess:
    """The Keras side in its own venv, trained one epoch at a time on request."""

    def __init__(self, python: str, data: Path, net: str, seed: int) -> None:
        from cnnlab.models import preset_layers

        layers = json.dumps(preset_layers(net, 10, (1, 28, 28)))
        cmd = [python, str(ROOT / "benchmarks" / "keras_side.py"), "--data", str(data)]
        cmd += ["--layers", layers, "--seed", str(seed)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.result: dict = {**self._ask(None), "epoch_seconds": []}

    def _ask(self, command: str | None) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            sys.exit(f"the Keras side stopped (exit {self.proc.wait()}); see its messages above")
        return json.loads(line)

    def epoch(self) -> None:
        self.result["epoch_seconds"].append(self._ask("epoch")["seconds"])

    def finish(self) -> dict:
        self.result.update(self._ask("evaluate"))
        self.proc.wait()
        return self.result


def alternate(
    python: str, data: Path, net: str, epochs: int, seed: int, project: Path, amp: bool
) -> tuple[dict, dict]:
    """Train the net in Keras and in cnnlab, one Keras epoch before each cnnlab epoch."""
    from cnnlab import api
    from cnnlab.inference import predict_logits, uses_bf16
    from cnnlab.models import summarize_model
    from cnnlab.training.loop import Callback

    keras = KerasProcess(python, data, net, seed)

    class KerasEpochFirst(Callback):
        def on_epoch_begin(self, trainer, logs):  # cnnlab's epoch clock has not started yet
            keras.epoch()

    result = api.train(
        callbacks=[KerasEpochFirst()],
        report=False,
        project=str(project),
        name=net,
        seed=seed,
        data__dataset="fashion-mnist",
        data__val_split=0.2,
        model__preset=net,
        train__epochs=epochs,
        train__batch_size=128,
        train__optimizer="adam",
        train__lr=1e-3,
        train__weight_decay=0.0,
        train__schedule__name="constant",
        train__label_smoothing=0.0,
        train__tta_flip=False,
        train__amp=amp,
        train__early_stopping__enabled=False,
        train__early_stopping__restore_best=False,
        data__augment__shift=0.0,
        data__augment__flip=False,
    )
    keras_result = keras.finish()
    precision = "bf16 autocast" if uses_bf16(torch.device("cpu"), amp) else "fp32"
    test = result.training.data.test
    model, prep = result.training.model, result.training.info.preprocessing
    predict_logits(model, test.images[:1024], prep)  # warm-up
    started = time.perf_counter()
    predict_logits(model, test.images, prep)
    eval_rate = len(test) / (time.perf_counter() - started)
    cnnlab_result = {
        "framework": f"cnnlab (torch {torch.__version__}, {precision})",
        "params": summarize_model(model).total_params,
        "epoch_seconds": [row["seconds"] for row in result.training.history],
        "test_accuracy": result.test_accuracy,
        "eval_images_per_second": eval_rate,
    }
    return keras_result, cnnlab_result


def steady(seconds: list[float]) -> float:
    """Median epoch time without the first epoch (graph tracing, warm-up) when there are more."""
    return median(seconds[1:] if len(seconds) > 1 else seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keras-python", default=str(ROOT / ".venv-keras" / "bin" / "python"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cnnlab with bf16 autocast where the CPU has AMX or AVX512-BF16 (its default)",
    )
    args = parser.parse_args()
    print(machine_line(), flush=True)
    rows: list[list[str]] = []
    results: dict[str, list[tuple[float, float]]] = {net: [] for net in args.nets}
    with tempfile.TemporaryDirectory(prefix="cnnlab-vs-keras-") as tmp:
        for seed in args.seeds:
            data = Path(tmp) / f"fashion-mnist-split-{seed}.npz"
            n_train, n_test = export_split(data, seed)
            print(
                f"Seed {seed}. Fashion-MNIST 28x28: {n_train:,} training images, {n_test:,} test "
                f"images; batch 128, Adam 1e-3, {args.epochs} epochs, no augmentation.\n",
                flush=True,
            )
            for net in args.nets:
                pair = alternate(
                    args.keras_python, data, net, args.epochs, seed, Path(tmp) / "runs", args.amp
                )
                rows += result_rows(net, seed, n_train, *pair)
                keras_r, cnnlab_r = pair
                ratio = steady(keras_r["epoch_seconds"]) / steady(cnnlab_r["epoch_seconds"])
                gap = 100 * (cnnlab_r["test_accuracy"] - keras_r["test_accuracy"])
                results[net].append((ratio, gap))
    print()
    print(
        table(
            [
                "net",
                "seed",
                "framework",
                "params",
                "epoch 1 s",
                "epoch s (median 2..)",
                "train img/s",
                "eval img/s",
                "test acc",
                "speed vs Keras",
            ],
            rows,
        )
    )
    print()
    for net, pairs in results.items():
        ratio = statistics.median(r for r, _ in pairs)
        gap = statistics.fmean(g for _, g in pairs)
        verdict = "met" if ratio >= 4 and abs(gap) <= 0.5 else "NOT met"
        over = f" (median of {len(pairs)} seeds)" if len(pairs) > 1 else ""
        gap_over = f" on the mean of {len(pairs)} seeds" if len(pairs) > 1 else ""
        print(
            f"{net}: cnnlab {ratio:.1f}x faster per epoch than Keras{over}, accuracy "
            f"{gap:+.2f} points{gap_over}; target 4x at equal accuracy (±0.5): {verdict}"
        )
    speedups = [statistics.median(r for r, _ in pairs) for pairs in results.values()]
    print(f"geometric mean speed-up: {statistics.geometric_mean(speedups):.1f}x")


def result_rows(
    net: str, seed: int, n_train: int, keras_r: dict, cnnlab_r: dict
) -> list[list[str]]:
    """The table rows of one net and seed: Keras', then cnnlab's."""
    for r in (keras_r, cnnlab_r):
        print(
            f"{net:8s} {r['framework']}: epochs "
            + ", ".join(f"{s:.1f}s" for s in r["epoch_seconds"])
            + f"; test accuracy {r['test_accuracy']:.4f}",
            flush=True,
        )
    keras_epoch = steady(keras_r["epoch_seconds"])
    rows = []
    for who, r in (("keras", keras_r), ("cnnlab", cnnlab_r)):
        epoch = steady(r["epoch_seconds"])
        rows.append(
            [
                net,
                str(seed),
                r["framework"],
                f"{r['params']:,}",
                f"{r['epoch_seconds'][0]:.1f}",
                f"{epoch:.2f}",
                f"{n_train / epoch:,.0f}",
                f"{r['eval_images_per_second']:,.0f}",
                f"{r['test_accuracy']:.4f}",
                "1.0x" if who == "keras" else f"{keras_epoch / epoch:.1f}x",
            ]
        )
    return rows


if __name__ == "__main__":
    main()
