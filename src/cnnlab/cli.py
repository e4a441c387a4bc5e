"""The `cnnlab` command line: parses arguments, calls the API, prints results; nothing more."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from cnnlab.errors import CnnlabError, ConfigError

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130
Handler = Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------- helpers
def out(text: str = "") -> None:
    print(text, flush=True)


def load_model_arg(value: str) -> dict[str, Any]:
    """--model: a preset name, or a YAML file holding a layer list (or `layers:` / `model:`)."""
    path = Path(value)
    if path.suffix.lower() not in (".yaml", ".yml") and not path.exists():
        return {"preset": value, "layers": None}
    if not path.is_file():
        raise ConfigError(f"Model file {path} does not exist. Give a preset name or a YAML file.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if isinstance(raw, dict) and "model" in raw:
        raw = raw["model"]
    if isinstance(raw, dict) and "layers" in raw:
        raw = raw["layers"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{path} must hold a list of layers (or a mapping with `layers:`), e.g.\n"
            "  layers:\n    - Conv2D: {filters: 32, kernel_size: 3, activation: relu}\n"
            "    - Flatten: {}\n    - Dense: {units: 10, activation: softmax}"
        )
    return {"preset": None, "layers": raw}


def parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """--set train.lr=0.01 data.augment.flip=true (values parsed as YAML scalars)."""
    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.lr=0.01), got '{pair}'.")
        result[key.strip()] = yaml.safe_load(value)
    return result


# Command-line flags that map onto config keys: dest -> dotted key.
TRAIN_FLAGS = {
    "dataset": "data.dataset",
    "data": "data.path",
    "data_dir": "data.data_dir",
    "val_split": "data.val_split",
    "val_size": "data.val_size",
    "test_split": "data.test_split",
    "standardize": "data.standardize",
    "shift": "data.augment.shift",
    "flip": "data.augment.flip",
    "erase": "data.augment.erase",
    "image_size": "data.image_size",
    "color_mode": "data.color_mode",
    "resize": "data.resize",
    "splits": "data.splits_file",
    "limit": "data.limit",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "optimizer": "train.optimizer",
    "lr": "train.lr",
    "momentum": "train.momentum",
    "nesterov": "train.nesterov",
    "weight_decay": "train.weight_decay",
    "label_smoothing": "train.label_smoothing",
    "schedule": "train.schedule.name",
    "decay_rate": "train.schedule.decay_rate",
    "decay_steps": "train.schedule.decay_steps",
    "staircase": "train.schedule.staircase",
    "warmup": "train.schedule.warmup",
    "min_lr": "train.schedule.min_lr",
    "patience": "train.early_stopping.patience",
    "min_delta": "train.early_stopping.min_delta",
    "early_stopping": "train.early_stopping.enabled",
    "restore_best": "train.early_stopping.restore_best",
    "monitor": "train.monitor",
    "balance": "train.balance",
    "device": "train.device",
    "threads": "train.threads",
    "compile": "train.compile",
    "amp": "train.amp",
    "tta_flip": "train.tta_flip",
    "checkpoint_every_steps": "train.checkpoint_every_steps",
    "checkpoint_every_minutes": "train.checkpoint_every_minutes",
    "seed": "seed",
    "name": "name",
    "project": "project",
}


def config_from_args(args: argparse.Namespace) -> Any:
    from cnnlab.config import RunConfig, load_config

    base = load_config(args.config) if args.config else RunConfig()
    overrides: dict[str, Any] = {}
    for dest, key in TRAIN_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = value
    if args.augment:
        overrides.setdefault("data.augment.shift", 0.1)
        overrides.setdefault("data.augment.flip", True)
    if args.model is not None:
        model = load_model_arg(args.model)
        overrides["model.preset"], overrides["model.layers"] = model["preset"], model["layers"]
    overrides.update(parse_set(args.set or []))
    return base.with_overrides(overrides) if overrides else base


# ---------------------------------------------------------------------------------- commands
def cmd_datasets(args: argparse.Namespace) -> int:
    from cnnlab.data.registry import list_datasets

    data_dir = existing_folder(args.data_dir, "--data-dir") if args.data_dir else None
    rows = []
    for source in list_datasets():
        h, w, c = source.image_shape
        rows.append(
            {
                "name": source.name,
                "train": source.num_train,
                "test": source.num_test,
                "shape": f"{h}x{w}x{c}",
                "classes": len(source.classes),
                "available": source.available(data_dir),
                "description": source.description,
            }
        )
    if args.format == "json":
        out(json.dumps(rows, indent=2))
        return EXIT_OK
    out(f"{'name':<15}{'train':>8}{'test':>8}  {'shape':<9}{'classes':>8}  {'here':<5} description")
    for r in rows:
        here = "yes" if r["available"] else "no"
        out(
            f"{r['name']:<15}{r['train']:>8,}{r['test']:>8,}  {r['shape']:<9}{r['classes']:>8}  "
            f"{here:<5} {r['description']}"
        )
    out(
        "\n'here: no' datasets download on first use (or see `cnnlab train --help` for --data-dir)."
    )
    return EXIT_OK


def existing_folder(value: str, flag: str) -> Path:
    """A folder argument that must exist (and be a folder), or a ConfigError saying so."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{flag} {path} does not exist. Check the path or create the folder.")
    if not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; give the folder that holds the files.")
    return path


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise ConfigError(f"--input-shape must be H,W,C like 28,28,1; got '{text}'.")
    return parts  # type: ignore[return-value]


def cmd_summary(args: argparse.Namespace) -> int:
    from cnnlab.models import format_summary, preset_layers, summarize

    height, width, channels = parse_shape(args.input_shape)
    model = load_model_arg(args.model)
    shape = (channels, height, width)
    layers = model["layers"] or preset_layers(model["preset"], args.classes, shape)
    result = summarize(layers, shape, args.classes)
    out(json.dumps(result.to_dict(), indent=2) if args.format == "json" else format_summary(result))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from cnnlab import api

    if args.resume:
        from cnnlab.training import runs

        run_dir = runs.resolve_run_dir(args.resume)
        epochs = runs.read_config(run_dir).train.epochs
        out(f"Resuming {run_dir}")
    else:
        config = config_from_args(args)
        epochs = config.train.epochs
        if args.print_config:
            out(config.to_yaml())
            return EXIT_OK
    from cnnlab.training.progress import ProgressLogger

    progress = ProgressLogger(epochs, out, bar=sys.stderr.isatty() and not args.quiet)
    if args.resume:
        run = api.train(resume=args.resume, callbacks=[progress])
    else:
        run = api.train(config, callbacks=[progress])
    _print_train_summary(run)
    out(f"Results saved to {run.run_dir}")
    return EXIT_OK


def _print_train_summary(run: Any) -> None:
    t = run.training
    best = next((r for r in t.history if int(r["epoch"]) == t.best_epoch), None)
    took = f"Training took {t.seconds:.1f}s."
    if best and "val_accuracy" in best:
        out(
            f"Best epoch {t.best_epoch}: val_loss {best['val_loss']:.4f}, "
            f"val_acc {best['val_accuracy']:.4f}. {took}"
        )
    else:  # no validation set
        out(took)
    if run.evaluation is not None:
        e = run.evaluation
        out(
            f"Test: loss {e.loss:.4f}, accuracy {e.accuracy:.4f}, macro F1 {e.macro_f1:.4f} "
            f"({e.labels.shape[0]:,} images)."
        )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cnnlab import api

    evaluation = api.evaluate(args.run, split=args.split, tta_flip=args.tta_flip, amp=args.amp)
    if args.format == "json":
        out(json.dumps(evaluation.to_dict(), indent=2))
        return EXIT_OK
    out(f"{evaluation.split} images: {evaluation.labels.shape[0]:,}")
    out(
        f"loss {evaluation.loss:.4f}   accuracy {evaluation.accuracy:.4f}   "
        f"macro F1 {evaluation.macro_f1:.4f}   weighted F1 {evaluation.weighted_f1:.4f}"
    )
    top = "   ".join(f"top-{k} {v:.4f}" for k, v in evaluation.top_k_accuracy.items())
    out(f"{top}   ECE {evaluation.expected_calibration_error:.4f}\n")
    out(evaluation.report_text)
    out("Confusion matrix (rows: true, columns: predicted):")
    out(format_matrix(evaluation.confusion, evaluation.classes))
    out(f"\nResults saved to {args.run}")
    return EXIT_OK


def format_matrix(matrix: Any, classes: Sequence[str]) -> str:
    width = max(6, *(len(str(v)) + 1 for v in matrix.flatten()))
    short = [c[: width - 1] for c in classes]
    label_w = max(len(c) for c in classes) + 1
    lines = [" " * label_w + "".join(f"{c:>{width}}" for c in short)]
    for name, row in zip(classes, matrix.tolist(), strict=True):
        lines.append(f"{name:<{label_w}}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnlab.evaluation import predict_files

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be 1 or more, got {args.top_k}. Try --top-k 3.")
    predictions, skipped = predict_files(args.run, args.images, top_k=args.top_k)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if args.format == "json":
        out(json.dumps([p.to_dict() for p in predictions], indent=2))
    elif args.format == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(["image", "rank", "class", "probability"])
        for p in predictions:
            for rank, (name, prob) in enumerate(p.top, 1):
                writer.writerow([p.source, rank, name, f"{prob:.6f}"])
    else:
        for p in predictions:
            out(p.source)
            for rank, (name, prob) in enumerate(p.top, 1):
                out(f"  {rank}. {name:<24} {prob:7.2%}")
    if not predictions:
        raise CnnlabError(
            "No image could be read; see the reasons above. Give PNG, JPEG, WebP, BMP or GIF "
            "files, or folders holding them."
        )
    return EXIT_OK


# ---------------------------------------------------------------------------------- parser
EXAMPLES = {
    "datasets": "cnnlab datasets\n  cnnlab datasets --format json",
    "summary": "cnnlab summary --model basic --input-shape 32,32,3 --classes 10\n"
    "  cnnlab summary --model my_model.yaml --input-shape 28,28,1",
    "train": "cnnlab train --dataset fashion-mnist --model basic --epochs 3\n"
    "  cnnlab train --dataset digits --model tiny --epochs 20 --schedule exponential "
    "--decay-rate 0.9 --decay-steps 100\n"
    "  cnnlab train --data ~/photos --image-size 64 64 --augment\n"
    "  cnnlab train --config runs/train/config.yaml\n"
    "  cnnlab train --resume runs/train",
    "evaluate": "cnnlab evaluate runs/train\n  cnnlab evaluate runs/train --format json",
    "predict": "cnnlab predict runs/train shoe.png\n"
    "  cnnlab predict runs/train photos/ --top-k 5 --format csv",
}


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML run config (e.g. a previous run's config.yaml)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint")
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset", help="registry name: digits, fashion-mnist, mnist, cifar10, cifar100"
    )
    g.add_argument("--data", metavar="PATH", help="a folder of images, one sub-folder per class")
    g.add_argument("--data-dir", help="folder searched first for dataset files")
    g.add_argument("--val-split", type=float, help="fraction of train held out (default 0.1)")
    g.add_argument("--val-size", type=int, help="number of train images held out")
    g.add_argument("--test-split", type=float, help="folder data without test/: fraction for test")
    g.add_argument(
        "--standardize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-channel mean/std normalisation after rescaling to [0, 1]",
    )
    g.add_argument("--augment", action="store_true", help="shorthand for --shift 0.1 --flip")
    g.add_argument("--shift", type=float, help="random shifts up to this fraction (e.g. 0.1)")
    g.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips",
    )
    g.add_argument(
        "--erase",
        type=float,
        metavar="P",
        help="random erasing: zero a random rectangle of each image with probability P (e.g. 0.5)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="folder data: resize images to H x W",
    )
    g.add_argument("--color-mode", choices=("grayscale", "rgb"), help="folder data: channels")
    g.add_argument("--resize", choices=("stretch", "crop", "pad"), help="folder data: resize mode")
    g.add_argument("--splits", metavar="CSV", help="folder data: reuse a run's splits.csv")
    g.add_argument("--limit", type=int, help="use only N training images (quick experiments)")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", help="preset (tiny, basic, dropout, fast, wide) or a YAML layer list")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", choices=("adam", "adamw", "adamax", "sgd", "rmsprop"))
    g.add_argument("--lr", type=float, help="initial learning rate")
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--label-smoothing", type=float)
    g.add_argument(
        "--schedule", choices=("constant", "exponential", "cosine", "onecycle", "plateau")
    )
    g.add_argument("--decay-rate", type=float, help="exponential schedule: factor per period")
    g.add_argument("--decay-steps", type=int, help="exponential schedule: steps per period")
    g.add_argument("--staircase", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--warmup", type=float, help="onecycle: fraction of training warming up")
    g.add_argument("--min-lr", type=float)
    g.add_argument(
        "--monitor", choices=("val_loss", "val_accuracy", "val_macro_f1", "val_balanced_accuracy")
    )
    g.add_argument("--patience", type=int, help="early stopping patience in epochs")
    g.add_argument("--min-delta", type=float)
    g.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--restore-best", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--balance", choices=("none", "weights", "sampler"))
    g.add_argument(
        "--tta-flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average predictions with the mirrored image at evaluation",
    )
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--name", help="run folder name (default train; auto-numbered)")
    g.add_argument("--project", help="parent folder of runs (default runs)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    g.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default 0: the cores other processes leave free, rechecked twice "
        "a second; a fixed count gives bit-identical reruns on a busy machine too)",
    )
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast on CUDA and on CPUs with bf16 in hardware (AMX or AVX512-BF16; "
        "default on); --no-amp for fp32 throughout",
    )
    g.add_argument("--checkpoint-every-steps", type=int)
    g.add_argument("--checkpoint-every-minutes", type=float)
    g.add_argument(
        "--set",
        nargs="+",
        action="extend",  # --set a=1 --set b=2 applies both
        metavar="KEY=VALUE",
        help="override config keys (--set may repeat), e.g. --set train.schedule.min_lr=1e-5",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from cnnlab import __version__

    parser = argparse.ArgumentParser(
        prog="cnnlab",
        description="Train, evaluate, explain and tune CNN image classifiers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `cnnlab COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog="examples:\n  " + EXAMPLES.get(name, f"cnnlab {name}"),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks and debug logs",
        )
        return p

    p = command(
        "datasets", "list the built-in datasets and whether their files are here", cmd_datasets
    )
    p.add_argument("--data-dir", help="also look in this folder")
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = command(
        "summary", "print a model's layers, output shapes, parameters and FLOPs", cmd_summary
    )
    p.add_argument("--model", default="fast", help="preset name or YAML layer list")
    p.add_argument("--input-shape", required=True, help="H,W,C like Keras, e.g. 28,28,1")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--format", choices=("table", "json"), default="table")

    p = command(
        "train", "train a model; writes a run folder with weights, metrics and report", cmd_train
    )
    add_train_arguments(p)

    p = command(
        "evaluate", "test-set metrics, classification report and confusion matrix", cmd_evaluate
    )
    p.add_argument("run", help="run folder, e.g. runs/train")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast as the run trained (default: the run's train.amp); --no-amp: fp32",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = command("predict", "top-k classes with probabilities for images or folders", cmd_predict)
    p.add_argument("run", help="run folder, e.g. runs/train")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    from cnnlab.commands import COMMANDS

    for register in COMMANDS:
        register(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("matplotlib", "PIL", "optuna", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or EXIT_OK)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CnnlabError as exc:
        if debug:
            raise
        from cnnlab.training.run import TrainingInterrupted

        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, TrainingInterrupted) else EXIT_USAGE
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # the environment, not a bug: a full disk, a read-only folder
        if debug:
            raise
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE


def describe_os_error(exc: OSError) -> str:
    """One paragraph for an operating-system error that escaped the library's own checks."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"The disk is full{where}. Free some space or write elsewhere, then retry."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"Permission denied{where}. Choose a folder you can write to (--project) or fix "
            "its permissions, then retry."
        )
    return f"{exc.strerror or exc}{where}. Check the path and retry (--debug shows details)."


if __name__ == "__main__":
    sys.exit(main())
