"""report.html: one self-contained page per run (summary, curves, test metrics, errors, calibration)."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from cnnlab import fileio
from cnnlab.config import RunConfig
from cnnlab.data.prepare import PreparedData, augment_of, prepare_data
from cnnlab.data.types import ImageSet
from cnnlab.evaluation import Evaluation, evaluate_model, reliability_bins
from cnnlab.models import CnnModel, summarize_model
from cnnlab.models.summary import format_count
from cnnlab.reporting import html as h
from cnnlab.reporting.images import save_sample_grid
from cnnlab.reporting.plots import (
    confusion_figure,
    heatmap_overlay,
    learning_curves_figure,
    reliability_figure,
)
from cnnlab.training import runs
from cnnlab.training.checkpoint import ModelInfo, load_model

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
HIGHEST_LOSS = 16  # images in the highest-loss gallery
CONFUSED_PAIRS = 5  # most-confused (true, predicted) pairs shown
PAIR_EXAMPLES = 6  # example images per pair


@dataclass
class _RunContext:
    """Everything the sections read: the run's files, its model, its data and its evaluation."""

    run_dir: Path
    config: RunConfig
    environment: dict[str, Any]
    history: list[dict[str, float]]
    model: CnnModel
    info: ModelInfo
    data: PreparedData
    evaluation: Evaluation | None


def write_report(
    run_dir: Path, evaluation: Evaluation | None = None, data: PreparedData | None = None
) -> Path:
    """Write RUN/report.html and return its path.

    `evaluation` is the run's test evaluation (as api.train computed it); when None the test
    split is evaluated here exactly like `cnnlab evaluate RUN` does, so the numbers agree.
    `data` is the run's prepared data when the caller has it in memory (saves reloading it).
    """
    run_dir = runs.resolve_run_dir(run_dir)
    context = _load(run_dir, evaluation, data)
    sections = [_overview(context), _model_section(context), _curves_section(context)]
    evaluation, test = context.evaluation, context.data.test
    if evaluation is not None and test is not None:
        sections += [
            _test_section(evaluation),
            _confused_section(evaluation, test),
            _highest_loss_section(context, evaluation, test),
            _calibration_section(evaluation),
        ]
    sections.append(_data_section(context))
    name = context.config.data.path or context.config.data.dataset
    subtitle = (
        f"{name} · model {context.info.model_name or 'custom'} · "
        f"written {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"
    )
    path = run_dir / REPORT_FILE
    fileio.write_text(path, h.page(f"cnnlab report: {run_dir.name}", subtitle, sections))
    log.debug("Report saved to %s", path)
    return path


def _load(run_dir: Path, evaluation: Evaluation | None, data: PreparedData | None) -> _RunContext:
    config = runs.read_config(run_dir)
    model, info = load_model(run_dir)
    if data is None:
        data = prepare_data(config.data, config.seed)
    test = data.test
    if test is None or len(test) == 0:
        evaluation = None
    elif evaluation is None or not np.array_equal(evaluation.labels, test.labels.numpy()):
        evaluation = evaluate_model(
            model,
            test,
            info.preprocessing,
            info.classes,
            batch_size=config.train.eval_batch_size,
            tta_flip=config.train.tta_flip,
            amp=config.train.amp,
        )
    return _RunContext(
        run_dir=run_dir,
        config=config,
        environment=runs.read_environment(run_dir),
        history=runs.read_metrics(run_dir),
        model=model,
        info=info,
        data=data,
        evaluation=evaluation,
    )


# ------------------------------------------------------------------------------------ sections
def _overview(c: _RunContext) -> h.Section:
    d, t, e = c.data, c.config.train, c.environment
    channels, height, width = d.input_shape
    seconds = sum(row.get("seconds", 0.0) for row in c.history)
    items = [("epochs run", h.fmt(len(c.history))), ("best epoch", h.fmt(c.info.epoch))]
    items.append(("training time", _duration(seconds)))
    if c.evaluation is not None:
        items.append(("test accuracy", h.fmt(c.evaluation.accuracy)))
        items.append(("test macro F1", h.fmt(c.evaluation.macro_f1)))
    sizes = d.sizes()
    dataset = h.table(
        ["split", "images"],
        [[split, h.fmt(count)] for split, count in sizes.items()]
        + [["total", h.fmt(sum(sizes.values()))]],
        numeric=[1],
        total_rows=1,
    )
    data_facts = h.key_values(
        [
            ("dataset", c.config.data.path or c.config.data.dataset),
            ("input shape (H x W x C)", f"{height} x {width} x {channels}"),
            ("classes", f"{len(d.classes)}: {', '.join(d.classes)}"),
            ("pixels", _pixels_text(c.info)),
            ("augmentation", _augment_text(c.config)),
        ]
    )
    sched = t.schedule
    schedule = sched.name if sched.name == "constant" else f"{sched.name} ({_schedule_args(c)})"
    stopping = (
        f"patience {t.early_stopping.patience} on {t.monitor}"
        if t.early_stopping.enabled
        else "off"
    )
    settings = h.key_values(
        [
            ("epochs (asked)", t.epochs),
            ("batch size", t.batch_size),
            ("optimizer", t.optimizer),
            ("learning rate", f"{t.lr:g}"),
            ("weight decay", f"{t.weight_decay:g}"),
            ("label smoothing", f"{t.label_smoothing:g}"),
            ("schedule", schedule),
            ("early stopping", stopping),
            ("best weights by", f"{c.info.monitor or t.monitor} = {h.fmt(c.info.monitor_value)}"),
            ("class balance", t.balance),
            ("seed", c.config.seed),
        ]
    )
    machine = h.key_values(
        [
            ("processor", e.get("processor", "?")),
            ("CPU cores / threads", f"{e.get('cpu_count', '?')} / {e.get('threads', '?')}"),
            ("GPU", e.get("cuda") or "none"),
            ("platform", e.get("platform", "?")),
            ("cnnlab", e.get("cnnlab", "?")),
            ("Python", e.get("python", "?")),
            ("PyTorch", e.get("torch", "?")),
            ("command", e.get("command", "?")),
        ]
    )
    body = (
        h.cards(items)
        + '<div class="grid2">'
        + f"<div><h3>Dataset</h3>{data_facts}{dataset}</div>"
        + f"<div><h3>Training settings</h3>{settings}</div>"
        + "</div>"
        + f"<h3>Hardware and software</h3>{machine}"
    )
    return h.Section("overview", "Run at a glance", body)


def _model_section(c: _RunContext) -> h.Section:
    summary = summarize_model(c.model)
    rows: list[list[object]] = [
        [
            h.esc(row.name),
            h.esc("(" + ", ".join(str(n) for n in row.output_shape) + ")"),
            h.fmt(row.params),
            h.fmt(row.flops),
        ]
        for row in summary.rows
    ]
    rows.append(["total", "", h.fmt(summary.total_params), h.fmt(summary.flops)])
    table = h.table(
        ["layer (type)", "output shape", "parameters", "FLOPs"],
        rows,
        numeric=[2, 3],
        raw=True,
        total_rows=1,
    )
    note = (
        f"Trainable parameters {summary.trainable_params:,}, non-trainable "
        f"{summary.non_trainable_params:,}; {format_count(summary.flops)}FLOPs per image. "
        "Shapes are channels last, as Keras prints them."
    )
    if summary.final_activation:
        note += f" The final {summary.final_activation} is applied to the logits by the caller."
    return h.Section("model", "Model", table + f'<p class="note">{h.esc(note)}</p>')


def _curves_section(c: _RunContext) -> h.Section:
    if not c.history:
        return h.Section("curves", "Learning curves", '<p class="note">No epoch finished.</p>')
    fig = learning_curves_figure(c.history, c.info.epoch, c.config.train.label_smoothing)
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    figure = h.img(h.figure_png(fig), "learning curves")
    note = (
        f"The dashed line marks epoch {c.info.epoch}, whose weights were kept "
        f"(best {c.info.monitor or c.config.train.monitor})."
    )
    columns = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")
    rows = [
        [int(row["epoch"])]
        + [h.fmt(row.get(k), 6 if k == "lr" else 1 if k == "seconds" else 4) for k in columns]
        for row in c.history
    ]
    table = h.table(
        ["epoch", "train loss", "train acc", "val loss", "val acc", "lr", "seconds"],
        rows,
        numeric=range(7),
    )
    return h.Section("curves", "Learning curves", figure + f'<p class="note">{note}</p>' + table)


def _test_section(e: Evaluation) -> h.Section:
    items = [
        ("images", h.metric_span("images", int(e.labels.shape[0]))),
        ("loss", h.metric_span("loss", e.loss)),
        ("accuracy", h.metric_span("accuracy", e.accuracy)),
        ("macro F1", h.metric_span("macro_f1", e.macro_f1)),
        ("weighted F1", h.metric_span("weighted_f1", e.weighted_f1)),
    ]
    for k, value in e.top_k_accuracy.items():
        if k > 1:
            items.append((f"top-{k} accuracy", h.metric_span(f"top{k}_accuracy", value)))
    items.append(
        (
            "calibration error",
            h.metric_span("expected_calibration_error", e.expected_calibration_error),
        )
    )
    rows: list[list[object]] = []
    for name in e.classes:
        r = e.report[name]
        rows.append(
            [
                h.esc(name),
                h.fmt(r["precision"]),
                h.fmt(r["recall"]),
                f'<span data-class="{h.esc(name)}" data-f1="{float(r["f1-score"])!r}">'
                f"{h.fmt(r['f1-score'])}</span>",
                h.fmt(int(r["support"])),
            ]
        )
    for avg in ("macro avg", "weighted avg"):
        r = e.report[avg]
        rows.append(
            [
                avg,
                h.fmt(r["precision"]),
                h.fmt(r["recall"]),
                h.fmt(r["f1-score"]),
                h.fmt(int(r["support"])),
            ]
        )
    report = h.table(
        ["class", "precision", "recall", "F1", "support"],
        rows,
        numeric=[1, 2, 3, 4],
        raw=True,
        total_rows=2,
    )
    counts = h.img(
        h.figure_png(confusion_figure(e.confusion, e.classes, False)), "confusion matrix", "wide"
    )
    rates = h.img(
        h.figure_png(confusion_figure(e.confusion, e.classes, True)),
        "normalised confusion matrix",
        "wide",
    )
    body = (
        h.cards(items)
        + f"<h3>Per-class report</h3>{report}"
        + "<h3>Confusion matrices</h3>"
        + '<p class="note">Rows are true classes, columns predicted classes; the second '
        "matrix divides each row by its number of images (recall on the diagonal).</p>"
        + counts
        + rates
    )
    return h.Section("test", f"Test results ({e.split})", body)


def most_confused_pairs(
    confusion: np.ndarray, limit: int = CONFUSED_PAIRS
) -> list[tuple[int, int, int]]:
    """(true, predicted, count) of the largest off-diagonal cells, largest first; zeros left out."""
    off = np.array(confusion, dtype=np.int64, copy=True)
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:limit]
    pairs = [(int(i // off.shape[1]), int(i % off.shape[1])) for i in order]
    return [(t, p, int(off[t, p])) for t, p in pairs if off[t, p] > 0]


def _tile(pixels: np.ndarray, alt: str, caption: str, extra: np.ndarray | None = None) -> str:
    images = h.img(h.tile_png(pixels), alt, "pixel")
    if extra is not None:
        images = f'<div class="pair">{images}{h.img(h.tile_png(extra), "Grad-CAM " + alt, "pixel")}</div>'
    klass = "tile" if extra is not None else "tile single"
    return f'<figure class="{klass}">{images}<figcaption>{caption}</figcaption></figure>'


def _confused_section(e: Evaluation, test: ImageSet) -> h.Section:
    pairs = most_confused_pairs(e.confusion)
    if not pairs:
        return h.Section(
            "confused",
            "Most-confused classes",
            '<p class="note">No test image was misclassified.</p>',
        )
    pixels = test.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    predicted = e.predictions
    parts = []
    for true, pred, count in pairs:
        support = int(e.confusion[true].sum())
        heading = (
            f"<h3>{h.esc(e.classes[true])} &rarr; predicted {h.esc(e.classes[pred])}: "
            f"{count} images ({count / max(support, 1):.1%} of {h.esc(e.classes[true])})</h3>"
        )
        where = np.flatnonzero((e.labels == true) & (predicted == pred))
        where = where[np.argsort(-e.probabilities[where, pred], kind="stable")][:PAIR_EXAMPLES]
        tiles = "".join(
            _tile(
                pixels[i],
                f"test image {i}",
                f"p = {e.probabilities[i, pred]:.2f} · #{i}",
            )
            for i in where
        )
        parts.append(heading + f'<div class="gallery">{tiles}</div>')
    note = '<p class="note">The most frequent mistakes, each with its most confident examples.</p>'
    return h.Section("confused", "Most-confused classes", note + "".join(parts))


def _highest_loss_section(c: _RunContext, e: Evaluation, test: ImageSet) -> h.Section:
    from cnnlab.explain import explain_images

    p_true = e.probabilities[np.arange(e.labels.shape[0]), e.labels]
    losses = -np.log(np.clip(p_true, 1e-12, None))
    worst = np.argsort(-losses, kind="stable")[:HIGHEST_LOSS]
    explanations = explain_images(c.model, c.info, test.images[torch.from_numpy(worst)])
    tiles = []
    for i, explanation in zip(worst, explanations, strict=True):
        true, pred = int(e.labels[i]), int(e.predictions[i])
        caption = (
            f"#{i} true <b>{h.esc(e.classes[true])}</b><br>predicted "
            f'<b class="bad">{h.esc(e.classes[pred])}</b> p={e.probabilities[i, pred]:.2f}'
            f"<br>p(true)={p_true[i]:.3f}, loss {losses[i]:.2f}"
        )
        overlay = heatmap_overlay(explanation.image, explanation.cam)
        tiles.append(_tile(explanation.image, f"test image {i}", caption, overlay))
    layer = explanations[0].layer if explanations else ""
    method = explanations[0].method if explanations else "Grad-CAM"
    note = (
        '<p class="note">The test images the model got most wrong (highest cross-entropy), each '
        f"beside its {method} map for the predicted class (layer {h.esc(layer)}): red marks the "
        "evidence the prediction rests on."
        + (
            " HiResCAM is Grad-CAM with gradients kept per position, which stays exact when the "
            "model flattens its feature maps into Dense layers."
            if method == "HiResCAM"
            else ""
        )
        + "</p>"
    )
    return h.Section(
        "errors", "Highest-loss test images", note + f'<div class="gallery">{"".join(tiles)}</div>'
    )


def _calibration_section(e: Evaluation) -> h.Section:
    bins = reliability_bins(e.probabilities, e.labels)
    figure = reliability_figure(
        bins.edges, bins.accuracy, bins.confidence, bins.counts, e.expected_calibration_error
    )
    rows = [
        [
            f"{bins.edges[b]:.2f}–{bins.edges[b + 1]:.2f}",
            h.fmt(int(bins.counts[b])),
            h.fmt(bins.confidence[b]),
            h.fmt(bins.accuracy[b]),
            h.fmt(bins.accuracy[b] - bins.confidence[b]),
        ]
        for b in np.flatnonzero(bins.counts)
    ]
    table = h.table(
        ["confidence bin", "images", "mean confidence", "accuracy", "accuracy − confidence"],
        rows,
        numeric=[1, 2, 3, 4],
        css_class="reliability",
    )
    note = (
        f"<p>Expected calibration error: <b>{h.fmt(e.expected_calibration_error)}</b> "
        "(support-weighted mean |accuracy − confidence| over 15 equal-width bins). Bars below "
        "the diagonal mean the model is over-confident there.</p>"
    )
    body = (
        note
        + f'<div class="grid2"><div>{h.img(h.figure_png(figure), "reliability diagram")}</div><div>{table}</div></div>'
    )
    return h.Section("calibration", "Calibration", body)


def _data_section(c: _RunContext) -> h.Section:
    samples = c.run_dir / "samples.png"
    if not samples.is_file():
        save_sample_grid(c.data.train.images, c.data.train.labels, c.data.classes, samples)
    body = "<h3>Sample training images per class</h3>" + h.img(
        samples.read_bytes(), "sample images per class"
    )
    augmentation = c.run_dir / "augmentation.png"
    if augmentation.is_file():
        body += "<h3>Augmentation preview</h3>" + h.img(
            augmentation.read_bytes(), "augmentation preview"
        )
    else:
        body += '<p class="note">Augmentation was off for this run (enable it with --augment).</p>'
    return h.Section("data", "Data", body)


# ------------------------------------------------------------------------------------- helpers
def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {rest:02d}s"


def _pixels_text(info: ModelInfo) -> str:
    prep = info.preprocessing
    if prep.mean is None:
        return "rescaled to [0, 1]"
    mean = ", ".join(f"{m:.3f}" for m in prep.mean)
    std = ", ".join(f"{s:.3f}" for s in (prep.std or ()))
    return f"rescaled to [0, 1], standardised (mean {mean}; std {std})"


def _augment_text(config: RunConfig) -> str:
    aug = config.data.augment
    if not augment_of(config.data).enabled:
        return "off"
    text = f"shift {aug.shift:g}, flip {'on' if aug.flip else 'off'}"
    return text + (f", random erasing {aug.erase:g}" if aug.erase else "")


def _schedule_args(c: _RunContext) -> str:
    s = c.config.train.schedule
    if s.name == "exponential":
        return f"rate {s.decay_rate:g} every {s.decay_steps} steps" + (
            ", staircase" if s.staircase else ""
        )
    if s.name == "plateau":
        return f"x{s.factor:g} after {s.patience} epochs without improvement"
    if s.name == "onecycle":
        return f"warmup {s.warmup:g}, min lr {s.min_lr:g}"
    return f"min lr {s.min_lr:g}"
