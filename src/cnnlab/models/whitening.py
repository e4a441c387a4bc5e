"""Patch whitening: a data-dependent initializer for Conv2D kernels (airbench's first layer).

A Conv2D with kernel_initializer="patch_whitening" gets, when training starts, filters that
whiten the image patches it sees: the leading eigenvectors of the patches' (uncentred)
covariance, each divided by the square root of its eigenvalue and paired with its negative, so
that a ReLU after it keeps both signs. Frozen (`trainable=False`), such a layer needs no
gradient at all, and the layers after it learn from decorrelated, unit-scale input.
"""

from __future__ import annotations

from typing import cast

import torch
from torch.nn import functional as F

from cnnlab.models.layers import WHITENING, CnnModel, KerasConv2D

WHITENING_EPS = 5e-4  # added to each eigenvalue: keeps the weakest directions from exploding
WHITENING_IMAGES = 5000  # training images the Trainer estimates the patch covariance from
_CHUNK = 512  # images per unfold, so one chunk's patch matrix stays a few MB


def patch_covariance(images: torch.Tensor, conv: KerasConv2D) -> torch.Tensor:
    """The uncentred covariance (d, d), d = C * kh * kw, of the conv's input patches in float64.

    Patches are taken where the kernel fits inside the image (no padding), at the conv's
    stride and dilation. images: (N, C, H, W) float, as the conv receives them.
    """
    dims = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    total = torch.zeros(dims, dims, dtype=torch.float64)
    count = 0
    for chunk in images.split(_CHUNK):
        patches = F.unfold(
            chunk.double(), conv.kernel_size, dilation=conv.dilation, stride=conv.stride
        )  # (n, d, positions)
        patches = patches.transpose(1, 2).reshape(-1, dims)
        total += patches.T @ patches
        count += patches.shape[0]
    return total / max(count, 1)


def whitening_filters(covariance: torch.Tensor, conv: KerasConv2D) -> torch.Tensor:
    """Filters (out, C, kh, kw): the ceil(out / 2) strongest eigenvectors, each divided by the
    square root of its eigenvalue, then the same filters negated; the first `out` of those."""
    out = conv.out_channels
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    keep = -(-out // 2)
    values = eigenvalues.flip(0)[:keep].clamp_min(0.0)
    vectors = eigenvectors.flip(1)[:, :keep].T  # (keep, d), strongest first
    scaled = vectors / torch.sqrt(values + WHITENING_EPS)[:, None]
    filters = torch.cat([scaled, -scaled])[:out]
    return filters.reshape(out, conv.in_channels, *conv.kernel_size)


def uses_whitening(model: CnnModel) -> bool:
    return any(spec.args.get("kernel_initializer") == WHITENING for spec in model.specs)


@torch.no_grad()
def init_whitening(model: CnnModel, images: torch.Tensor) -> None:
    """Set every patch-whitening Conv2D of `model` from `images`: normalised model inputs
    (N, C, H, W), float. The layers before such a conv run (in eval mode) to give its input."""
    modules = dict(model.layers.named_children())
    names = list(modules)
    was_training = model.training
    model.eval()
    try:
        for spec, name in zip(model.specs, model.layer_names, strict=True):
            if spec.kind != "Conv2D" or spec.args["kernel_initializer"] != WHITENING:
                continue
            conv = cast(KerasConv2D, modules[name])
            inputs = images.to(conv.weight.device, torch.float32)
            for before in names[: names.index(name)]:
                inputs = modules[before](inputs)
            covariance = patch_covariance(inputs.cpu(), conv)  # float64: not on every device
            conv.weight.copy_(whitening_filters(covariance, conv))
    finally:
        model.train(was_training)
