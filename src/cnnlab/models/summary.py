"""Keras-style model summaries: each layer's output shape, parameter count and FLOPs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from cnnlab.models.layers import CnnModel, LayerSpec, Shape, build_model

_MOVING_STATS = ("running_mean", "running_var")  # BatchNormalization's non-trainable weights


@dataclass
class LayerRow:
    """One line of the summary. output_shape is channels last with None for the batch."""

    name: str  # "conv2d (Conv2D)"
    output_shape: tuple[int | None, ...]  # (None, 29, 29, 32)
    params: int
    trainable: int
    flops: int  # per image


@dataclass
class ModelSummary:
    """Rows plus totals; input_shape is (C, H, W) as the data gives it."""

    rows: list[LayerRow]
    total_params: int
    trainable_params: int
    non_trainable_params: int
    flops: int  # per image
    input_shape: tuple[int, int, int]
    final_activation: str | None = None  # applied by callers to the logits, see CnnModel
    train_flops: int = 0  # per image for one training step: see training_flops

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: tuples become lists, None stays null."""
        out = asdict(self)
        out["rows"] = [{**row, "output_shape": list(row["output_shape"])} for row in out["rows"]]
        out["input_shape"] = list(self.input_shape)
        return out


def _keras_shape(shape: Shape) -> tuple[int | None, ...]:
    hwc = (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape
    return (None, *hwc)


def layer_flops(spec: LayerSpec, in_shape: Shape, out_shape: Shape) -> int:
    """FLOPs per image of one layer, by the convention documented in `summarize`."""
    kind, a, outputs = spec.kind, spec.args, math.prod(out_shape)
    if kind == "Conv2D":
        kh, kw = a["kernel_size"]
        macs = outputs * kh * kw * in_shape[0]
        return 2 * macs + (outputs if a["activation"] else 0)
    if kind == "Dense":
        return 2 * in_shape[0] * a["units"] + (outputs if a["activation"] else 0)
    if kind == "Activation":
        return outputs if a["activation"] else 0
    if kind in (
        "BatchNormalization",
        "Rescaling",
        "MaxPooling2D",
        "AveragePooling2D",
        "GlobalAveragePooling2D",
        "GlobalMaxPooling2D",
    ):
        return outputs
    return 0  # InputLayer, Dropout (identity at inference), Flatten (a reshape)


def _counts(module: nn.Module | None) -> tuple[int, int]:
    """(all weights, trainable weights) of a layer; BN's moving statistics count, as in Keras."""
    if module is None:
        return 0, 0
    params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    stats = sum(b.numel() for n, b in module.named_buffers() if n.endswith(_MOVING_STATS))
    return params + stats, trainable


def training_flops(rows: Sequence[LayerRow]) -> int:
    """FLOPs per image of a training step: each layer's forward, its weight gradients (as much
    again, for layers with trainable weights) and its input gradients (as much again, for layers
    after the first trainable one). A frozen first layer costs its forward only; with no frozen
    layers this is 3x the forward FLOPs minus the first layer's input gradient."""
    total, gradients_flow = 0, False
    for row in rows:
        total += row.flops * (1 + bool(row.trainable) + gradients_flow)
        gradients_flow = gradients_flow or bool(row.trainable)
    return total


def summarize_model(model: CnnModel) -> ModelSummary:
    """The summary of an already built model (its current requires_grad flags count)."""
    rows = []
    in_shape: Shape = model.input_shape
    modules = dict(model.layers.named_children())
    for spec, name, out_shape in zip(
        model.specs, model.layer_names, model.output_shapes, strict=True
    ):
        if spec.kind != "InputLayer":  # Keras does not list the input either
            params, trainable = _counts(modules.get(name))
            flops = layer_flops(spec, in_shape, out_shape)
            row = LayerRow(
                f"{name} ({spec.kind})", _keras_shape(out_shape), params, trainable, flops
            )
            rows.append(row)
        in_shape = out_shape
    total = sum(row.params for row in rows)
    trainable = sum(row.trainable for row in rows)
    return ModelSummary(
        rows=rows,
        total_params=total,
        trainable_params=trainable,
        non_trainable_params=total - trainable,
        flops=sum(row.flops for row in rows),
        input_shape=model.input_shape,
        final_activation=model.final_activation,
        train_flops=training_flops(rows),
    )


def summarize(
    layers: Sequence[Any], input_shape: tuple[int, int, int], num_classes: int
) -> ModelSummary:
    """Build the model and summarise it the way Keras' model.summary() does, plus FLOPs.

    Parameters are counted from the torch module; BatchNormalization counts 4*C of which 2*C
    (the moving mean and variance) are non-trainable, exactly like Keras.

    FLOPs per image, for one forward pass at inference:
    - Conv2D and Dense: 2 x multiply-accumulates (H_out * W_out * filters * kh * kw * C_in;
      in * units); bias additions are not counted;
    - an activation (inside Conv2D/Dense, or an Activation layer), BatchNormalization,
      Rescaling and every pooling layer: one FLOP per output element;
    - Dropout, Flatten and the input: zero.
    A final softmax counts too, though callers apply it to the logits the model returns.
    """
    return summarize_model(build_model(layers, input_shape, num_classes))


def format_size(num_bytes: float) -> str:
    """Bytes the way Keras prints weight memory: 881.29 KB (powers of 1024)."""
    units, i = ("B", "KB", "MB", "GB", "TB"), 0
    while num_bytes >= 1024 and i < len(units) - 1:
        num_bytes, i = num_bytes / 1024, i + 1
    return f"{num_bytes:.2f} {units[i]}"


def format_count(number: float) -> str:
    """A count with an SI suffix: 950, 1.23 K, 41.20 M, 3.10 G (powers of 1000)."""
    if number < 1000:
        return f"{number:.0f}"
    units, i = ("", "K", "M", "G", "T"), 0
    while number >= 1000 and i < len(units) - 1:
        number, i = number / 1000, i + 1
    return f"{number:.2f} {units[i]}"


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def format_summary(summary: ModelSummary) -> str:
    """A Keras-like table: Layer (type) | Output Shape | Param # | FLOPs, then the totals."""
    header = ("Layer (type)", "Output Shape", "Param #", "FLOPs")
    cells = [
        (row.name, _shape_text(row.output_shape), f"{row.params:,}", f"{row.flops:,}")
        for row in summary.rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) + 2 for i in range(4)]

    def line(values: Sequence[str]) -> str:
        left = values[0].ljust(widths[0]) + values[1].ljust(widths[1])
        return (" " + left + values[2].rjust(widths[2]) + values[3].rjust(widths[3])).rstrip()

    rule_width = sum(widths) + 1
    c, h, w = summary.input_shape
    lines = [
        f"Input shape: (None, {h}, {w}, {c})",
        "_" * rule_width,
        line(header),
        "=" * rule_width,
    ]
    for i, cell in enumerate(cells):
        lines.append(line(cell))
        lines.append("_" * rule_width if i < len(cells) - 1 else "=" * rule_width)
    lines += [
        f"Total params: {summary.total_params:,} ({format_size(4 * summary.total_params)})",
        f"Trainable params: {summary.trainable_params:,} "
        f"({format_size(4 * summary.trainable_params)})",
        f"Non-trainable params: {summary.non_trainable_params:,} "
        f"({format_size(4 * summary.non_trainable_params)})",
        f"FLOPs per image: {format_count(summary.flops)} "
        f"(a training step: {format_count(summary.train_flops)})",
    ]
    if summary.final_activation:
        lines.append(
            f"Final activation: {summary.final_activation} (the model returns logits; "
            f"probabilities = {summary.final_activation}(logits))"
        )
    return "\n".join(lines)
