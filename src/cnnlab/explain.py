"""Why a model predicts what it does: Grad-CAM and saliency (captum), feature maps and filters."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam, LayerGradientXActivation, Saliency
from torch import nn

from cnnlab import fileio
from cnnlab.errors import CnnlabError, ConfigError, ModelSpecError, did_you_mean
from cnnlab.inference import prepare_batch
from cnnlab.models import CnnModel, same_padding
from cnnlab.reporting.html import figure_png
from cnnlab.reporting.plots import channel_grid_figure, explanation_figure
from cnnlab.training import runs
from cnnlab.training.checkpoint import ModelInfo, load_model

log = logging.getLogger(__name__)

_FOLLOWERS = ("BatchNormalization", "Activation")  # a conv block's layers after the convolution


@dataclass
class Explanation:
    """Grad-CAM and saliency of one image for one class, with the model's top-k probabilities."""

    image: np.ndarray  # (H, W, C) uint8, as the model saw it
    target: int  # class index explained
    target_name: str
    top: list[tuple[str, float]]  # (class, probability), best first
    cam: np.ndarray  # (H, W) in [0, 1], Grad-CAM upsampled to the input
    saliency: np.ndarray  # (H, W) in [0, 1], max |d score / d pixel| over channels
    layer: str  # the layer the class activation map looked at
    method: str = "Grad-CAM"  # or "HiResCAM", see cam_method


@dataclass
class ExplainResult:
    """What `explain_file` wrote, and the explanation itself."""

    explanation: Explanation
    files: list[Path] = field(default_factory=list)


def conv_layers(model: CnnModel) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv2D layer, in order; each module's output is after its activation."""
    modules = dict(model.layers.named_children())
    return [
        (name, modules[name])
        for spec, name in zip(model.specs, model.layer_names, strict=True)
        if spec.kind == "Conv2D" and name in modules
    ]


def cam_layer(model: CnnModel) -> tuple[str, nn.Module]:
    """The last convolution, extended through the BatchNormalization/Activation that follow it.

    A conv-BN-ReLU block is explained at its activated output, as Grad-CAM intends.
    """
    modules = dict(model.layers.named_children())
    chosen: tuple[str, nn.Module] | None = None
    previous = ""  # the last layer with a module, so a follower can be matched to its conv
    for spec, name in zip(model.specs, model.layer_names, strict=True):
        if name not in modules:
            continue
        if spec.kind == "Conv2D" or (
            spec.kind in _FOLLOWERS and chosen is not None and chosen[0] == previous
        ):
            chosen = (name, modules[name])
        previous = name
    if chosen is None:
        raise ModelSpecError(
            "Grad-CAM needs a Conv2D layer, and this model has none. Explain a convolutional model."
        )
    return chosen


def _normalise_maps(maps: torch.Tensor) -> np.ndarray:
    """(B, H, W) -> each map scaled to [0, 1] by its own maximum (zeros stay zeros)."""
    flat = maps.flatten(1)
    low = flat.min(1).values[:, None, None]
    span = (flat.max(1).values[:, None, None] - low).clamp_min(1e-12)
    return ((maps - low) / span).detach().cpu().numpy()


def feature_grid(model: CnnModel, layer_name: str) -> tuple[list[float], list[float]]:
    """Where the cells of `layer_name`'s output sit on the input: centre of cell j is offset + step * j.

    Each convolution or pooling window centres output j at stride * j + (span - 1) / 2 - pad
    of its own input, so 'valid' layers shift and shrink the grid; composing them maps a
    feature map back onto the pixels it looked at. (offset, step) per axis (rows, columns).
    """
    offset, step = [0.0, 0.0], [1.0, 1.0]
    in_shape = model.input_shape
    for spec, name, out_shape in zip(
        model.specs, model.layer_names, model.output_shapes, strict=True
    ):
        a = spec.args
        if spec.kind in ("Conv2D", "MaxPooling2D", "AveragePooling2D"):
            kernel = a["kernel_size"] if spec.kind == "Conv2D" else a["pool_size"]
            dilation = a.get("dilation_rate", (1, 1))
            for axis in (0, 1):
                pad = 0
                if a["padding"] == "same":
                    pad = same_padding(
                        in_shape[1 + axis], kernel[axis], a["strides"][axis], dilation[axis]
                    )[0]
                span = (kernel[axis] - 1) * dilation[axis]
                offset[axis] += step[axis] * (span / 2 - pad)
                step[axis] *= a["strides"][axis]
        in_shape = out_shape
        if name == layer_name:
            break
    return offset, step


def _resample_matrix(size: int, cells: int, offset: float, step: float) -> torch.Tensor:
    """(size, cells) linear interpolation from a feature axis onto the pixels; clamped at the edges."""
    where = (np.arange(size) - offset) / step  # each pixel's position in feature cells
    eye = np.eye(cells)
    return torch.from_numpy(
        np.stack([np.interp(where, np.arange(cells), eye[j]) for j in range(cells)], axis=1)
    ).float()


def upsample_to_input(maps: torch.Tensor, model: CnnModel, layer_name: str) -> torch.Tensor:
    """(B, h, w) maps of a layer -> (B, H, W) on the input pixels, aligned by `feature_grid`."""
    _, height, width = model.input_shape
    offset, step = feature_grid(model, layer_name)
    rows = _resample_matrix(height, maps.shape[1], offset[0], step[0])  # (H, h)
    cols = _resample_matrix(width, maps.shape[2], offset[1], step[1])  # (W, w)
    return rows @ maps.float().cpu() @ cols.T


def cam_method(model: CnnModel, layer_name: str) -> str:
    """'Grad-CAM' when the layer reaches the classifier through global pooling, else 'HiResCAM'.

    Grad-CAM weighs each channel by its spatially averaged gradient. Behind Flatten + Dense the
    weights differ per position, and that average can flip sign: on the corner-squares set it
    points at the wrong quadrant 3 times in 4. HiResCAM (gradient x activation, summed over
    channels; Draelos & Carin 2020) is exact for such heads and equals Grad-CAM behind global
    average pooling.
    """
    after = False
    for spec, name in zip(model.specs, model.layer_names, strict=True):
        if after and spec.kind == "Flatten":
            return "HiResCAM"
        after = after or name == layer_name
    return "Grad-CAM"


def grad_cam(
    model: CnnModel, batch: torch.Tensor, targets: torch.Tensor, layer_name: str | None = None
) -> np.ndarray:
    """Class activation map upsampled onto the input: (B, H, W) in [0, 1], ReLU'd.

    captum's LayerGradCam on the layer (default `cam_layer(model)`), or LayerGradientXActivation
    summed over channels (HiResCAM) where `cam_method` says Grad-CAM would mislocate.
    """
    modules = dict(model.layers.named_children())
    name = layer_name if layer_name is not None else cam_layer(model)[0]
    if name not in modules:
        raise ModelSpecError(f"The model has no layer '{name}'. Layers: {', '.join(modules)}.")
    if cam_method(model, name) == "Grad-CAM":
        cam = LayerGradCam(model, modules[name]).attribute(
            batch, target=targets, relu_attributions=True
        )[:, 0]  # (B, h, w)
    else:
        cam = LayerGradientXActivation(model, modules[name]).attribute(batch, target=targets)
        cam = cam.sum(1).clamp_min(0)  # (B, h, w)
    return _normalise_maps(upsample_to_input(cam.detach(), model, name).clamp_min(0))


def saliency(model: CnnModel, batch: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """Gradient saliency: max over channels of |d score / d input|, scaled to [0, 1]: (B, H, W)."""
    grads = Saliency(model).attribute(batch.clone().requires_grad_(True), target=targets)
    return _normalise_maps(grads.abs().amax(1))


def explain_images(
    model: CnnModel,
    info: ModelInfo,
    images: torch.Tensor,  # (N, C, H, W) uint8 at the model's input shape
    targets: torch.Tensor | None = None,
    top_k: int = 3,
    batch_size: int = 256,
) -> list[Explanation]:
    """Grad-CAM and saliency of each image for `targets` (default: the predicted class)."""
    model.eval()
    layer_name = cam_layer(model)[0]
    method = cam_method(model, layer_name)
    device = next(model.parameters()).device
    results: list[Explanation] = []
    k = max(1, min(top_k, len(info.classes)))
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size]
        batch = prepare_batch(chunk, info.preprocessing, device, channels_last=False)
        with torch.no_grad():
            probabilities = F.softmax(model(batch).float(), dim=1)
        chosen = (
            probabilities.argmax(1)
            if targets is None
            else targets[start : start + batch_size].to(device)
        )
        cams = grad_cam(model, batch, chosen, layer_name)
        maps = saliency(model, batch, chosen)
        values, indices = probabilities.topk(k, dim=1)
        pixels = chunk.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
        for i in range(chunk.shape[0]):
            target = int(chosen[i])
            top = [
                (info.classes[int(c)], float(p)) for p, c in zip(values[i], indices[i], strict=True)
            ]
            results.append(
                Explanation(
                    pixels[i],
                    target,
                    info.classes[target],
                    top,
                    cams[i],
                    maps[i],
                    layer_name,
                    method,
                )
            )
    return results


def feature_maps(
    model: CnnModel, info: ModelInfo, image: torch.Tensor
) -> list[tuple[str, np.ndarray]]:
    """The activations (C, H, W) of every Conv2D layer for one uint8 image (C, H, W)."""
    captured: list[tuple[str, np.ndarray]] = []
    hooks = []
    for name, module in conv_layers(model):

        def hook(_m: nn.Module, _inputs: object, output: torch.Tensor, name: str = name) -> None:
            captured.append((name, output[0].detach().float().cpu().numpy()))

        hooks.append(module.register_forward_hook(hook))
    try:
        batch = prepare_batch(
            image[None], info.preprocessing, next(model.parameters()).device, False
        )
        with torch.no_grad():
            model.eval()(batch)
    finally:
        for handle in hooks:
            handle.remove()
    return captured


def first_layer_filters(model: CnnModel) -> tuple[str, np.ndarray]:
    """The first Conv2D's kernels, each scaled to [0, 1]: (F, kh, kw) or (F, kh, kw, 3) for RGB input."""
    layers = conv_layers(model)
    if not layers:
        raise ModelSpecError("This model has no Conv2D layer, so it has no filters to show.")
    name, module = layers[0]
    weight = module.weight.detach().float().cpu()  # (F, C_in, kh, kw)
    low = weight.flatten(1).min(1).values[:, None, None, None]
    high = weight.flatten(1).max(1).values[:, None, None, None]
    scaled = ((weight - low) / (high - low).clamp_min(1e-12)).numpy()
    if scaled.shape[1] == 3:
        return name, scaled.transpose(0, 2, 3, 1)  # (F, kh, kw, 3)
    return name, scaled.mean(1)  # (F, kh, kw): channels averaged when not RGB


def resolve_target(target: str | int | None, classes: tuple[str, ...]) -> int | None:
    """A class name or index -> its index; None stays None (explain the predicted class)."""
    if target is None:
        return None
    text = str(target)
    if text in classes:
        return classes.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(classes):
        return int(text)
    raise ConfigError(
        f"Unknown class '{text}' for --target.{did_you_mean(text, classes)} Give a class name or "
        f"an index 0-{len(classes) - 1}: " + ", ".join(classes)
    )


def decode_for_model(path: Path, info: ModelInfo) -> torch.Tensor:
    """Decode an image file exactly like `cnnlab predict` does: uint8 (C, H, W)."""
    from cnnlab.data.images import decode_image

    channels, height, width = info.preprocessing.input_shape
    array = decode_image(
        path,
        image_size=(height, width),
        color_mode="grayscale" if channels == 1 else "rgb",
        resize=info.preprocessing.resize,
    )
    return torch.from_numpy(np.array(array, dtype=np.uint8, copy=True))


def explain_file(
    run_dir: str | Path,
    image_path: str | Path,
    *,
    target: str | int | None = None,
    top_k: int = 3,
    out_dir: str | Path | None = None,
    show_feature_maps: bool = False,
    show_filters: bool = False,
) -> ExplainResult:
    """Explain one image with a run's model; writes PNGs into `out_dir` (default RUN/explain).

    Files: <stem>_explain.png (input, Grad-CAM overlay, saliency, top-k), with
    --feature-maps <stem>_features_<layer>.png per convolution, with --filters filters_<layer>.png.
    """
    run_dir = runs.resolve_run_dir(run_dir)
    image_path = Path(image_path)
    if not image_path.is_file():
        raise CnnlabError(f"Image {image_path} does not exist. Check the path.")
    model, info = load_model(run_dir)
    image = decode_for_model(image_path, info)  # (C, H, W) uint8
    index = resolve_target(target, info.classes)
    targets = None if index is None else torch.tensor([index])
    explanation = explain_images(model, info, image[None], targets, top_k)[0]
    folder = Path(out_dir) if out_dir is not None else run_dir / "explain"
    folder.mkdir(parents=True, exist_ok=True)
    stem = image_path.stem
    result = ExplainResult(explanation)
    figure = explanation_figure(
        explanation.image,
        explanation.cam,
        explanation.saliency,
        explanation.top,
        explanation.target_name,
        explanation.layer,
        explanation.method,
    )
    result.files.append(_write_png(folder / f"{stem}_explain.png", figure_png(figure, dpi=110)))
    if show_feature_maps:
        for name, maps in feature_maps(model, info, image):
            title = f"{name}: {maps.shape[0]} feature maps of {maps.shape[1]}x{maps.shape[2]}"
            png = figure_png(channel_grid_figure(maps, title), dpi=90)
            result.files.append(_write_png(folder / f"{stem}_features_{name}.png", png))
    if show_filters:
        name, kernels = first_layer_filters(model)
        title = f"{name}: {kernels.shape[0]} filters of {kernels.shape[1]}x{kernels.shape[2]}"
        png = figure_png(channel_grid_figure(kernels, title, cmap="gray"), dpi=90)
        result.files.append(_write_png(folder / f"filters_{name}.png", png))
    log.debug("explain wrote %s", [str(p) for p in result.files])
    return result


def _write_png(path: Path, png: bytes) -> Path:
    fileio.write_bytes(path, png)
    return path
