"""Keras-named layer specs: their validation, Keras initializers, TF padding and the torch model."""

from __future__ import annotations

import functools
import itertools
import math
import operator
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cnnlab.errors import ModelSpecError, did_you_mean, unknown_name
from cnnlab.models import chain, fused

Shape = tuple[int, ...]  # one image's tensor shape, channels first: (C, H, W) or (features,)
# The dict form of one layer: {"Conv2D": {"filters": 32, "kernel_size": [3, 3]}}
LayerDict = dict[str, dict[str, Any]]
Pad = tuple[int, int, int, int]  # (left, right, top, bottom), the order F.pad takes

ACTIVATIONS: tuple[str, ...] = (
    "relu", "sigmoid", "tanh", "softmax", "elu", "selu", "gelu", "silu", "leaky_relu", "softplus",
    "linear",
)  # fmt: skip
_ACTIVATION_ALIASES = {"swish": "silu"}  # Keras 3 names it silu and keeps swish as an alias
FINAL_ACTIVATIONS: tuple[str, ...] = ("softmax", "sigmoid")  # understood at the end of a model

INITIALIZERS: tuple[str, ...] = (
    "glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal",
    "zeros", "ones", "random_normal", "random_uniform",
)  # fmt: skip
# cnnlab's one data-dependent initializer, for Conv2D kernels only (cnnlab.models.whitening): set
# from the training images when a Trainer starts; glorot_uniform until then.
WHITENING = "patch_whitening"

# Keras draws its *_normal initializers from a normal truncated at ±2 std, and divides the std
# by the std of that truncated unit normal so the variance stays the one the formula asks for.
_TRUNCATED_STD_CORRECTION = 0.87962566103423978

_REQUIRED = object()  # marks an argument without a default
Normaliser = Callable[[Any, str, str], Any]  # (value, where, argument) -> normalised value


# ---------------------------------------------------------------------------------------------
# Argument normalisers: each returns the canonical value or raises ModelSpecError that says what
# was received and what is allowed. `where` names the layer, e.g. "Layer 3 (Conv2D)".


def _bad(where: str, arg: str, value: Any, allowed: str) -> ModelSpecError:
    return ModelSpecError(f"{where}: {arg} must be {allowed}; received {value!r}.")


def _whole(value: Any) -> int | None:
    """The int a value stands for (ints, numpy ints), or None for bools, floats and the rest."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_int(value: Any, where: str, arg: str) -> int:
    number = _whole(value)
    if number is None or number < 1:
        raise _bad(where, arg, value, "a positive whole number such as 32")
    return number


def _pair(value: Any, where: str, arg: str) -> tuple[int, int]:
    allowed = "a positive int or a pair of positive ints such as [3, 3]"
    items = [value, value] if _whole(value) is not None else value
    if not isinstance(items, (list, tuple)) or len(items) != 2:
        raise _bad(where, arg, value, allowed)
    numbers = [_whole(item) for item in items]
    if any(n is None or n < 1 for n in numbers):
        raise _bad(where, arg, value, allowed)
    return (int(numbers[0]), int(numbers[1]))  # type: ignore[arg-type]


def _optional_pair(value: Any, where: str, arg: str) -> tuple[int, int] | None:
    return None if value is None else _pair(value, where, arg)


def _padding(value: Any, where: str, arg: str) -> str:
    if not isinstance(value, str) or value.lower() not in ("valid", "same"):
        raise _bad(
            where, arg, value, "'valid' (no padding) or 'same' (output size ceil(H / stride))"
        )
    return value.lower()


def _activation(value: Any, where: str, arg: str) -> str | None:
    """Canonical activation name; None stands for 'linear' (no activation), as in Keras."""
    if value is None:
        return None
    name = value.lower() if isinstance(value, str) else value
    name = _ACTIVATION_ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in ACTIVATIONS:
        hint = did_you_mean(str(value).lower(), ACTIVATIONS) if isinstance(value, str) else ""
        choices = ", ".join((*ACTIVATIONS, "swish", "None"))
        raise ModelSpecError(f"{where}: unknown {arg} {value!r}.{hint} Allowed: {choices}.")
    return None if name == "linear" else name


def _initializer(value: Any, where: str, arg: str, allowed: Sequence[str] = INITIALIZERS) -> str:
    # Keras also accepts the class names: GlorotUniform -> glorot_uniform.
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", value).lower() if isinstance(value, str) else value
    if name not in allowed:
        hint = did_you_mean(str(name), allowed) if isinstance(value, str) else ""
        only_conv = f" ({WHITENING} is for Conv2D kernels only)" if name == WHITENING else ""
        raise ModelSpecError(
            f"{where}: unknown {arg} {value!r}{only_conv}.{hint} Allowed: {', '.join(allowed)}."
        )
    return name


def _conv_kernel_initializer(value: Any, where: str, arg: str) -> str:
    return _initializer(value, where, arg, (*INITIALIZERS, WHITENING))


def _bool(value: Any, where: str, arg: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(where, arg, value, "true or false")
    return value


def _float(value: Any, where: str, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(where, arg, value, "a finite number such as 0.00392156862745098 (1/255)")
    return float(value)


def _rate(value: Any, where: str, arg: str) -> float:
    number = _float(value, where, arg)
    if not 0.0 <= number < 1.0:
        raise _bad(where, arg, value, "a fraction of inputs to drop, 0 <= rate < 1")
    return number


def _momentum(value: Any, where: str, arg: str) -> float:
    number = _float(value, where, arg)
    if not 0.0 <= number < 1.0:
        raise _bad(where, arg, value, "between 0 and 1 (Keras' default 0.99), 0 <= momentum < 1")
    return number


def _positive_float(value: Any, where: str, arg: str) -> float:
    number = _float(value, where, arg)
    if number <= 0.0:
        raise _bad(where, arg, value, "a number greater than 0 such as 0.001")
    return number


_RESERVED_NAMES = frozenset(dir(nn.Sequential))


def _layer_name(value: Any, where: str, arg: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise _bad(where, arg, value, "letters, digits and underscores, such as 'conv_1'")
    if value in _RESERVED_NAMES:
        raise _bad(where, arg, value, f"a name other than the reserved {sorted(_RESERVED_NAMES)}")
    return value


def _shape(value: Any, where: str, arg: str) -> tuple[int, ...]:
    allowed = "(height, width, channels) as in Keras, such as [28, 28, 1]"
    if not isinstance(value, (list, tuple)) or len(value) not in (1, 2, 3):
        raise _bad(where, arg, value, allowed)
    numbers = [_whole(item) for item in value]
    if any(n is None or n < 1 for n in numbers):
        raise _bad(where, arg, value, allowed)
    return tuple(int(n) for n in numbers)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The layers: canonical Keras name -> {argument: (default, normaliser)}.

_CONV_ARGS: dict[str, tuple[Any, Normaliser]] = {
    "filters": (_REQUIRED, _positive_int),
    "kernel_size": (_REQUIRED, _pair),
    "strides": (1, _pair),
    "padding": ("valid", _padding),
    "activation": (None, _activation),
    "use_bias": (True, _bool),
    "kernel_initializer": ("glorot_uniform", _conv_kernel_initializer),
    "bias_initializer": ("zeros", _initializer),
    "dilation_rate": (1, _pair),
}
_POOL_ARGS: dict[str, tuple[Any, Normaliser]] = {
    "pool_size": (2, _pair),
    "strides": (None, _optional_pair),  # None -> pool_size
    "padding": ("valid", _padding),
}
_SCHEMAS: dict[str, dict[str, tuple[Any, Normaliser]]] = {
    "InputLayer": {"shape": (_REQUIRED, _shape)},  # a check only: the data gives the shape
    "Conv2D": _CONV_ARGS,
    "MaxPooling2D": _POOL_ARGS,
    "AveragePooling2D": _POOL_ARGS,
    "Dropout": {"rate": (_REQUIRED, _rate)},
    "Flatten": {},
    "Dense": {
        "units": (_REQUIRED, _positive_int),
        "activation": (None, _activation),
        "use_bias": (True, _bool),
        "kernel_initializer": ("glorot_uniform", _initializer),
        "bias_initializer": ("zeros", _initializer),
    },
    "Rescaling": {"scale": (_REQUIRED, _float), "offset": (0.0, _float)},
    "BatchNormalization": {
        "momentum": (0.99, _momentum),
        "epsilon": (1e-3, _positive_float),
        "center": (True, _bool),
        "scale": (True, _bool),
    },
    "Activation": {"activation": (_REQUIRED, _activation)},
    "GlobalAveragePooling2D": {},
    "GlobalMaxPooling2D": {},
}
# Arguments every layer accepts; kept in LayerSpec.args only when given. trainable=False freezes
# the layer's weights, and makes a BatchNormalization use its moving statistics, as in Keras 3.
_COMMON_ARGS: dict[str, Normaliser] = {
    "name": _layer_name,
    "input_shape": _shape,
    "trainable": _bool,
}
_ALIASES = {
    "MaxPool2D": "MaxPooling2D",
    "AvgPool2D": "AveragePooling2D",
    "Convolution2D": "Conv2D",
    "Input": "InputLayer",
}
LAYERS: tuple[str, ...] = tuple(sorted((*_SCHEMAS, *_ALIASES)))  # every name a spec may use
_BY_LOWER = {name.lower(): _ALIASES.get(name, name) for name in LAYERS}


@dataclass(frozen=True)
class LayerSpec:
    """One validated layer: its canonical Keras name and its arguments with defaults filled.

    Pairs are tuples (kernel_size=(3, 3)), activations are canonical names or None for linear,
    and pooling strides equal pool_size when not given.
    """

    kind: str
    args: dict[str, Any]


def _canonical_kind(name: Any, where: str) -> str:
    kind = _BY_LOWER.get(name.lower()) if isinstance(name, str) else None
    if kind is None:
        raise ModelSpecError(f"{where}: {unknown_name('layer', str(name), LAYERS)}")
    return kind


def _normalise(kind: str, args: Mapping[str, Any], where: str) -> dict[str, Any]:
    schema = _SCHEMAS[kind]
    for arg in args:
        if arg not in schema and arg not in _COMMON_ARGS:
            valid = sorted((*schema, *_COMMON_ARGS))
            hint = did_you_mean(str(arg), valid)
            raise ModelSpecError(
                f"{where}: {kind} has no argument {arg!r}.{hint} "
                f"Valid arguments of {kind}: {', '.join(valid)}."
            )
    missing = [
        arg for arg, (default, _) in schema.items() if default is _REQUIRED and arg not in args
    ]
    if missing:
        raise ModelSpecError(
            f"{where}: {kind} needs the argument(s) {', '.join(missing)}; received only "
            f"{sorted(args) or 'no arguments'}."
        )
    out: dict[str, Any] = {}
    for arg, (default, normalise) in schema.items():
        out[arg] = normalise(args.get(arg, default), where, arg)  # defaults normalised too
    for arg, normalise in _COMMON_ARGS.items():
        if args.get(arg) is not None:
            out[arg] = normalise(args[arg], where, arg)
    if kind in ("MaxPooling2D", "AveragePooling2D") and out["strides"] is None:
        out["strides"] = out["pool_size"]
    return out


def _parse_one(item: Any, where: str) -> LayerSpec:
    if isinstance(item, LayerSpec):
        name, args = item.kind, item.args
    elif isinstance(item, str):
        name, args = item, {}
    elif isinstance(item, Mapping) and len(item) == 1:
        ((name, args),) = item.items()
        args = {} if args is None else args
    else:
        raise ModelSpecError(
            f"{where}: a layer is a one-key mapping such as {{'Conv2D': {{'filters': 32, "
            f"'kernel_size': 3}}}} or a bare name such as 'Flatten'; received {item!r}."
        )
    kind = _canonical_kind(name, where)
    if not isinstance(args, Mapping):
        raise ModelSpecError(
            f"{where}: the arguments of {kind} must be a mapping such as {{'rate': 0.25}}; "
            f"received {args!r}."
        )
    return LayerSpec(kind, _normalise(kind, args, f"{where} ({kind})"))


def parse_spec(layers: Sequence[Any]) -> list[LayerSpec]:
    """Validate a model spec (dicts, bare names or LayerSpecs) into canonical LayerSpecs."""
    if isinstance(layers, (str, Mapping)) or not isinstance(layers, Sequence):
        raise ModelSpecError(
            "A model spec is a list of layers such as [{'Conv2D': {'filters': 32, "
            "'kernel_size': 3}}, 'Flatten', {'Dense': {'units': 10}}]; received "
            f"{type(layers).__name__} {layers!r}."
        )
    if not layers:
        raise ModelSpecError("The model spec has no layers; give at least one Dense layer.")
    return [_parse_one(item, f"Layer {i}") for i, item in enumerate(layers, start=1)]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def spec_to_list(specs: Sequence[LayerSpec]) -> list[LayerDict]:
    """The YAML/JSON form of parsed specs (tuples become lists); parse_spec reverses it."""
    return [{spec.kind: {k: _plain(v) for k, v in spec.args.items()}} for spec in specs]


def layer_names(specs: Sequence[LayerSpec]) -> list[str]:
    """Keras-style names: conv2d, conv2d_1, max_pooling2d, ...; a `name` argument wins."""
    given = [spec.args["name"] for spec in specs if "name" in spec.args]
    taken = set(given)
    if len(taken) < len(given):
        twice = sorted({name for name in given if given.count(name) > 1})
        raise ModelSpecError(
            f"Several layers of the model spec have the same name {', '.join(twice)}; "
            "each layer's name must be unique."
        )
    counts: dict[str, int] = {}
    names = []
    for spec in specs:
        if "name" in spec.args:
            names.append(spec.args["name"])
            continue
        base = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", spec.kind).lower()
        base = base.replace("2_d", "2d")  # MaxPooling2D -> max_pooling2d, as Keras writes it
        while True:
            n = counts.get(base, 0)
            counts[base] = n + 1
            name = base if n == 0 else f"{base}_{n}"
            if name not in taken:
                break
        taken.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# Shapes: what each layer makes of its input, with TF's rules for 'same' and 'valid'.


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF's 'same' padding of one dimension as (before, after): output ceil(size / stride),
    the odd pixel going after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _window_out(size: int, kernel: int, stride: int, padding: str, dilation: int = 1) -> int:
    if padding == "same":
        return -(-size // stride)
    span = (kernel - 1) * dilation + 1
    return (size - span) // stride + 1 if size >= span else 0


def _fmt_hwc(shape: Shape) -> str:
    if len(shape) == 3:
        return f"{shape[1]}x{shape[2]}x{shape[0]} (H x W x C)"
    return f"a flat vector of {shape[0]} values"


def _keras_shape(shape: Shape) -> tuple[int, ...]:
    """Channels-last view of a channels-first shape, as Keras prints it."""
    return (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape


def _need_image(spec: LayerSpec, shape: Shape, where: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ModelSpecError(
            f"{where}: {spec.kind} needs an image tensor (H, W, C) but receives {_fmt_hwc(shape)} "
            "(the output of Flatten, Dense or global pooling). Move it before Flatten."
        )
    return shape[0], shape[1], shape[2]


def _declared_shape_matches(declared: tuple[int, ...], shape: Shape) -> bool:
    """Keras' input_shape against the data; (28, 28) stands for grayscale (28, 28, 1) as in
    the Keras MNIST tutorials' Flatten(input_shape=(28, 28))."""
    actual = _keras_shape(shape)
    return declared == actual or (len(actual) == 3 and actual[2] == 1 and declared == actual[:2])


def _out_shape(spec: LayerSpec, shape: Shape, where: str) -> Shape:
    kind, a = spec.kind, spec.args
    if "input_shape" in a and not _declared_shape_matches(a["input_shape"], shape):
        raise ModelSpecError(
            f"{where}: input_shape={list(a['input_shape'])} but the data gives it "
            f"{list(_keras_shape(shape))} (H, W, C). Remove input_shape (cnnlab takes the shape "
            "from the data) or correct it."
        )
    if kind == "InputLayer":
        if not _declared_shape_matches(a["shape"], shape):
            raise ModelSpecError(
                f"{where}: shape={list(a['shape'])} but the data gives images of "
                f"{list(_keras_shape(shape))} (H, W, C). Remove the Input layer (cnnlab takes "
                "the shape from the data) or correct it."
            )
        return shape
    if kind in ("Conv2D", "MaxPooling2D", "AveragePooling2D"):
        c, h, w = _need_image(spec, shape, where)
        size_arg = "kernel_size" if kind == "Conv2D" else "pool_size"
        k, s, pad = a[size_arg], a["strides"], a["padding"]
        d = a.get("dilation_rate", (1, 1))
        oh, ow = _window_out(h, k[0], s[0], pad, d[0]), _window_out(w, k[1], s[1], pad, d[1])
        if oh < 1 or ow < 1:
            raise ModelSpecError(
                f"{where}: {size_arg} {k[0]}x{k[1]} with padding 'valid' does not fit its input "
                f"of {_fmt_hwc(shape)}: the output would be {max(oh, 0)}x{max(ow, 0)}. Allowed: "
                "a window no larger than its input. Use padding='same', a smaller "
                f"{size_arg}, fewer pooling layers before it, or larger images."
            )
        if kind == "Conv2D" and a["kernel_initializer"] == WHITENING:
            _check_whitening(a, shape, where)
        return (a["filters"] if kind == "Conv2D" else c, oh, ow)
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return (_need_image(spec, shape, where)[0],)
    if kind == "Flatten":
        return (math.prod(shape),)
    if kind == "Dense":
        if len(shape) != 1:
            raise ModelSpecError(
                f"{where}: Dense receives a 4-D tensor of shape (None, {shape[1]}, {shape[2]}, "
                f"{shape[0]}); Dense needs a flat (None, features) input here. Add Flatten() or "
                "GlobalAveragePooling2D() before it."
            )
        return (a["units"],)
    return shape  # Dropout, Rescaling, BatchNormalization, Activation keep the shape


def _check_whitening(a: dict[str, Any], shape: Shape, where: str) -> None:
    """patch_whitening takes its patches from inside the input: two filters per patch value."""
    c, h, w = shape
    (kh, kw), (dh, dw) = a["kernel_size"], a["dilation_rate"]
    limit = 2 * c * kh * kw
    if a["filters"] > limit:
        raise ModelSpecError(
            f"{where}: kernel_initializer '{WHITENING}' gives at most {limit} filters for a "
            f"{kh}x{kw} kernel on {c} input channel(s) (two per patch value); received "
            f"filters={a['filters']}. Use filters={limit} or fewer, or a larger kernel_size."
        )
    span_h, span_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if h < span_h or w < span_w:
        raise ModelSpecError(
            f"{where}: kernel_initializer '{WHITENING}' takes {span_h}x{span_w} patches from "
            f"inside its input of {_fmt_hwc(shape)}. Use a smaller kernel_size, larger images "
            "or another kernel_initializer."
        )


def _check_output(specs: Sequence[LayerSpec], shapes: Sequence[Shape], num_classes: int) -> None:
    final = shapes[-1]
    if final == (num_classes,):
        return
    if len(final) == 3:
        raise ModelSpecError(
            f"The model ends with output shape (None, {final[1]}, {final[2]}, {final[0]}) but must "
            f"end with one value per class, (None, {num_classes}). Add Flatten() (or "
            f"GlobalAveragePooling2D()) and Dense({num_classes}, activation='softmax') at the end."
        )
    dense = [i for i, spec in enumerate(specs) if spec.kind == "Dense"]
    units = final[0]
    if dense and shapes[dense[-1]] == final:
        i = dense[-1]
        hint = ""
        if units == 1 and num_classes == 2:
            hint = (
                " Dense(1, activation='sigmoid') is Keras' binary set-up; cnnlab gives one output "
                "per class: use Dense(2, activation='softmax')."
            )
        raise ModelSpecError(
            f"Layer {i + 1} (Dense), the final Dense, has units={units} but the data has "
            f"{num_classes} classes. Allowed: units={num_classes}, one output per class.{hint}"
        )
    raise ModelSpecError(
        f"The model outputs {units} values per image but the data has {num_classes} classes; "
        f"end it with Dense({num_classes}, activation='softmax')."
    )


def _check_input_shape(input_shape: Any) -> tuple[int, int, int]:
    numbers = [_whole(n) for n in input_shape] if isinstance(input_shape, (list, tuple)) else []
    if len(numbers) != 3 or any(n is None or n < 1 for n in numbers):
        raise ModelSpecError(
            f"input_shape must be (channels, height, width) of one image, such as (1, 28, 28); "
            f"received {input_shape!r}."
        )
    return (int(numbers[0]), int(numbers[1]), int(numbers[2]))  # type: ignore[arg-type]


def _check_num_classes(num_classes: Any) -> int:
    number = _whole(num_classes)
    if number is None or number < 1:
        raise ModelSpecError(f"num_classes must be a positive int; received {num_classes!r}.")
    return number


def infer_shapes(
    layers: Sequence[Any], input_shape: tuple[int, int, int], num_classes: int | None = None
) -> list[Shape]:
    """Each layer's output shape for one image, channels first, checking that every layer fits
    and (given num_classes) that the model ends with one value per class."""
    specs = parse_spec(layers)
    shape: Shape = _check_input_shape(input_shape)
    shapes = []
    for i, spec in enumerate(specs, start=1):
        shape = _out_shape(spec, shape, f"Layer {i} ({spec.kind})")
        shapes.append(shape)
    if num_classes is not None:
        _check_output(specs, shapes, _check_num_classes(num_classes))
    return shapes


# ---------------------------------------------------------------------------------------------
# Initializers with Keras' formulas. Fans as Keras computes them: a kernel's receptive field
# (kh * kw) multiplies both fans; a 1-D tensor (a bias) has fan_in = fan_out = its length.


def _fans(tensor: torch.Tensor) -> tuple[int, int]:
    if tensor.ndim == 1:
        return tensor.shape[0], tensor.shape[0]
    receptive = math.prod(tensor.shape[2:])  # torch weights are (out, in, kh, kw) or (out, in)
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


@torch.no_grad()
def initialize(tensor: torch.Tensor, initializer: str) -> torch.Tensor:
    """Fill `tensor` in place the way Keras' initializer of that name does, through nn.init."""
    fan_in, fan_out = _fans(tensor)
    if initializer == WHITENING:  # the data sets it later (cnnlab.models.whitening)
        initializer = "glorot_uniform"
    if initializer == "zeros":
        return nn.init.zeros_(tensor)
    if initializer == "ones":
        return nn.init.ones_(tensor)
    if initializer == "random_normal":
        return nn.init.normal_(tensor, mean=0.0, std=0.05)
    if initializer == "random_uniform":
        return nn.init.uniform_(tensor, -0.05, 0.05)
    scale, fan = {
        "glorot": (1.0, (fan_in + fan_out) / 2.0),
        "he": (2.0, float(fan_in)),
        "lecun": (1.0, float(fan_in)),
    }[initializer.split("_")[0]]
    variance = scale / max(1.0, fan)  # Keras' VarianceScaling
    if initializer.endswith("_uniform"):
        limit = math.sqrt(3.0 * variance)  # glorot: sqrt(6 / (fan_in + fan_out))
        return nn.init.uniform_(tensor, -limit, limit)
    std = math.sqrt(variance) / _TRUNCATED_STD_CORRECTION
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


# ---------------------------------------------------------------------------------------------
# Modules. Parameters sit directly on each layer's module so state_dict keys read like Keras'
# weights: "layers.conv2d.weight", "layers.dense_1.bias", "layers.batch_normalization.running_var".


def activation_module(name: str | None) -> nn.Module:
    """The torch module of a canonical activation name (None: identity)."""
    modules: dict[str | None, Callable[[], nn.Module]] = {
        None: nn.Identity,
        "relu": nn.ReLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "softmax": lambda: nn.Softmax(dim=1),  # dim 1 = channels/features, Keras' last axis
        "elu": nn.ELU,
        "selu": nn.SELU,
        "gelu": nn.GELU,  # exact erf form, Keras' default approximate=False
        "silu": nn.SiLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.2),  # Keras 3's default negative_slope
        "softplus": nn.Softplus,
    }
    return modules[name]()


def _same_pad(
    shape: Shape, kernel: tuple[int, int], strides: tuple[int, int], dilation=(1, 1)
) -> Pad:
    top, bottom = same_padding(shape[1], kernel[0], strides[0], dilation[0])
    left, right = same_padding(shape[2], kernel[1], strides[1], dilation[1])
    return (left, right, top, bottom)


class KerasConv2D(nn.Conv2d):
    """Conv2D with TF 'same' padding (explicit when uneven) and its activation."""

    def __init__(self, in_channels: int, a: dict[str, Any], pad: Pad, activation: str | None):
        even = pad[0] == pad[1] and pad[2] == pad[3]
        super().__init__(
            in_channels,
            a["filters"],
            a["kernel_size"],
            stride=a["strides"],
            padding=(pad[2], pad[0]) if even else 0,
            dilation=a["dilation_rate"],
            bias=a["use_bias"],
        )
        self.uneven_pad: Pad | None = None if even else pad  # F.pad before the convolution
        self.activation_name = activation
        self.act = activation_module(activation)
        self.defer_activation = False  # set by CnnModel: a following MaxPool applies it in training
        self.defer_in_eval = False  # and in evaluation too (inference copies, see folding.py)
        initialize(self.weight, a["kernel_initializer"])
        if self.bias is not None:
            initialize(self.bias, a["bias_initializer"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, filters, H', W')
        if self.uneven_pad is not None:
            x = F.pad(x, self.uneven_pad)
        return self.forward_padded(x)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """forward for an input that already carries the uneven padding's zeros."""
        x = super().forward(x)
        deferred = self.defer_activation and (self.training or self.defer_in_eval)
        return x if deferred else self.act(x)

    def pad_for_pool(self, pool: nn.Module, height: int, width: int) -> Pad | None:
        """This conv's uneven padding without the bottom rows and right columns that only feed
        outputs the 'valid' max pool after it drops, for a height x width input; None where
        that trims nothing. `dropout`'s third conv on 7x7 Fashion-MNIST maps: its 2x2 'same'
        padding makes 7x7 outputs of which the pool reads 6x6, so it runs unpadded, with 27%
        fewer products and no pad pass. The pooled values and all gradients stay the same."""
        if (
            self.uneven_pad is None
            or not isinstance(pool, KerasMaxPool2D)
            or pool.pad is not None
            or pool.padding not in (0, (0, 0))
            or pool.dilation not in (1, (1, 1))
            or pool.ceil_mode
        ):
            return None
        left, right, top, bottom = self.uneven_pad
        (kh, kw), (ph, pw), (sh, sw) = (
            self.kernel_size,
            _as_pair(pool.kernel_size),
            _as_pair(pool.stride),
        )
        new_bottom = _pad_read(height + top, bottom, kh, self.stride[0], self.dilation[0], ph, sh)
        new_right = _pad_read(width + left, right, kw, self.stride[1], self.dilation[1], pw, sw)
        if (new_bottom, new_right) == (bottom, right):
            return None
        return left, new_right, top, new_bottom


def _as_pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _pad_read(
    size: int, after: int, kernel: int, stride: int, dilation: int, pool: int, pool_stride: int
) -> int:
    """The fewest of `after` trailing padding pixels that keep every conv output a 'valid'
    pool reads, for `size` pixels with any leading padding included."""

    def outputs(pad: int) -> int:
        return _window_out(size + pad, kernel, stride, "valid", dilation)

    full = outputs(after)
    if full < pool:
        return after
    read = (_window_out(full, pool, pool_stride, "valid") - 1) * pool_stride + pool
    return next(pad for pad in range(after + 1) if outputs(pad) >= read)


# Dense layers with at most this many weights run in fp32 under CPU bf16 autocast: their
# matrix products take microseconds, and the casts and oneDNN's bf16 calls around them cost
# more than they save (fp32 forward and backward 1.2-1.9x faster than bf16 for 400x64, 64x10,
# 256x10 and 512x10 at batch 128; 0.6-0.8x for 512x256 and 576x512).
FP32_DENSE_MAX_WEIGHTS = 32 * 1024


class KerasDense(nn.Linear):
    """Dense with its activation; small ones in fp32 under CPU autocast (FP32_DENSE_MAX_WEIGHTS)."""

    def __init__(self, in_features: int, a: dict[str, Any], activation: str | None):
        super().__init__(in_features, a["units"], bias=a["use_bias"])
        self.act = activation_module(activation)
        initialize(self.weight, a["kernel_initializer"])
        if self.bias is not None:
            initialize(self.bias, a["bias_initializer"])

    @property
    def fp32_under_autocast(self) -> bool:
        """Whether this Dense stays float32 under CPU bf16 autocast (FP32_DENSE_MAX_WEIGHTS)."""
        return self.weight.numel() <= FP32_DENSE_MAX_WEIGHTS

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, units)
        if self.fp32_under_autocast and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self.act(F.linear(x.float(), self.weight, self.bias))
        return self.act(super().forward(x))


# Non-decreasing activations commute with max pooling: max(f(a), f(b)) = f(max(a, b)), and the
# gradient reaches the same input. Applying them after the pool touches a quarter of the pixels.
POOL_COMMUTING_ACTIVATIONS = frozenset(
    {"relu", "sigmoid", "tanh", "elu", "selu", "leaky_relu", "softplus"}
)


class KerasMaxPool2D(nn.MaxPool2d):
    """MaxPooling2D; 'same' pads with -inf so padding never wins the max, as in TF.

    Without autograd, pools whose window equals their stride run `tile_max` (3-5x faster on CPU
    than max_pool2d, which also computes indices); same values. With autograd, 2x2 pools on the
    CPU run cnnlab's C kernel (cnnlab.models.fused.max_pool) where it is built. In training,
    `deferred_act` is the previous Conv2D's activation, applied here after pooling (exact, see
    POOL_COMMUTING_ACTIVATIONS); evaluation and explanations keep Keras' order unless
    `defer_in_eval` is set (inference copies, see cnnlab.models.folding.inference_copy).
    """

    def __init__(self, a: dict[str, Any], pad: Pad):
        super().__init__(a["pool_size"], a["strides"])
        self.pad: Pad | None = pad if any(pad) else None
        self.deferred_act: nn.Module | None = None
        self.defer_in_eval = False
        self.tiled = tuple(a["pool_size"]) == tuple(a["strides"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H', W')
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if needs_grad and fused.pool_fits(self, x):
            x = fused.max_pool(self, x)  # pads itself
        else:
            if self.pad is not None:
                x = F.pad(x, self.pad, value=float("-inf"))
            if self.tiled and not needs_grad:
                x = tile_max(x, self.kernel_size)
            else:
                x = super().forward(x)
        if self.deferred_act is not None and (self.training or self.defer_in_eval):
            x = self.deferred_act(x)
        return x


def tile_max(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Max over non-overlapping (kh, kw) tiles, the incomplete edge dropped (Keras 'valid').

    Rows first, then columns, on the (B, H, W, C) view: with channels_last storage each maximum
    reads whole contiguous rows and then contiguous channel runs, 1.3-2.5x faster than the
    maximum of kh * kw strided views (and 3-5x faster than max_pool2d). The result has
    channels_last strides.
    """
    kh, kw = size
    rows, cols = x.shape[2] // kh * kh, x.shape[3] // kw * kw
    tiles = x.permute(0, 2, 3, 1)[:, :rows, :cols]  # (B, H, W, C)
    tiles = functools.reduce(torch.maximum, tiles.unflatten(1, (rows // kh, kh)).unbind(2))
    tiles = functools.reduce(torch.maximum, tiles.unflatten(2, (cols // kw, kw)).unbind(3))
    return tiles.permute(0, 3, 1, 2)


class KerasAvgPool2D(nn.AvgPool2d):
    """AveragePooling2D; with 'same', padded pixels are left out of each average, as in TF."""

    def __init__(self, a: dict[str, Any], pad: Pad, in_shape: Shape):
        super().__init__(a["pool_size"], a["strides"])
        self.pad: Pad | None = pad if any(pad) else None
        if self.pad is not None:  # pool_area / real pixels in each window, fixed by the input size
            ones = F.pad(torch.ones(1, 1, in_shape[1], in_shape[2]), self.pad)
            counts = F.avg_pool2d(ones, self.kernel_size, self.stride)  # real / area
            self.register_buffer("rescale", 1.0 / counts, persistent=False)  # (1, 1, H', W')

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H', W')
        if self.pad is None:
            return super().forward(x)
        return super().forward(F.pad(x, self.pad)) * self.rescale


class KerasDropout(nn.Dropout):
    """Element-wise dropout, as Keras' Dropout: zero each value with probability p in training,
    scale the rest by 1 / (1 - p).

    On the CPU the C kernel in `fused.dropout` draws the mask with a counter-based generator and
    applies it in one pass (the mask is drawn again in the backward pass). Elsewhere the
    keep-mask comes from torch.rand, not torch.bernoulli_ as in F.dropout: 1.4-1.7x faster on
    CPU. Both draw from PyTorch's global generator, so torch.manual_seed fixes the masks.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        if fused.dropout_fits(x):
            return fused.dropout(x, self.p)
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep * (1.0 / (1.0 - self.p))


class KerasFlatten(nn.Module):
    """Flatten in channels-last order, (B, C, H, W) -> (B, H*W*C).

    Keras flattens (H, W, C) tensors, so the Dense after it sees pixel-major, channel-minor
    elements; flattening the same way keeps Dense weights portable between Keras and cnnlab.
    With channels_last inputs the permute is free (a view).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)  # (B, H, W, C) -> (B, H*W*C)


class GlobalPool2D(nn.Module):
    """GlobalAveragePooling2D / GlobalMaxPooling2D: (B, C, H, W) -> (B, C)."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode  # "avg" or "max"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        # Not amax: in bf16 on CPU adaptive_max_pool2d is 3x faster forward and 5-8x faster
        # with its backward, which routes each gradient to one maximum (amax splits ties).
        return F.adaptive_max_pool2d(x, 1).flatten(1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class KerasRescaling(nn.Module):
    """x * scale + offset, as Keras' Rescaling."""

    def __init__(self, scale: float, offset: float):
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset

    def extra_repr(self) -> str:
        return f"scale={self.scale}, offset={self.offset}"


def _batch_norm(a: dict[str, Any], shape: Shape) -> nn.Module:
    # Keras: moving = moving * momentum + batch * (1 - momentum); torch weighs the batch by its
    # momentum, so torch momentum = 1 - Keras momentum. center/scale drop beta/gamma.
    kind = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
    bn = kind(shape[0], eps=a["epsilon"], momentum=1.0 - a["momentum"])
    if not a["scale"]:
        bn.weight = None  # type: ignore[assignment]
    if not a["center"]:
        bn.bias = None  # type: ignore[assignment]
    return bn


def _build_layer(spec: LayerSpec, in_shape: Shape, strip_activation: bool) -> nn.Module | None:
    """The module of one layer, or None for layers that compute nothing here."""
    kind, a = spec.kind, spec.args
    activation = None if strip_activation else a.get("activation")
    if kind == "Conv2D":
        pad = (0, 0, 0, 0)
        if a["padding"] == "same":
            pad = _same_pad(in_shape, a["kernel_size"], a["strides"], a["dilation_rate"])
        return KerasConv2D(in_shape[0], a, pad, activation)
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        pad = (0, 0, 0, 0)
        if a["padding"] == "same":
            pad = _same_pad(in_shape, a["pool_size"], a["strides"])
        if kind == "MaxPooling2D":
            return KerasMaxPool2D(a, pad)
        return KerasAvgPool2D(a, pad, in_shape)
    if kind == "Dense":
        return KerasDense(in_shape[0], a, activation)
    if kind == "Dropout":
        return KerasDropout(a["rate"])
    if kind == "Flatten":
        return KerasFlatten() if len(in_shape) == 3 else None
    if kind == "Rescaling":
        return KerasRescaling(a["scale"], a["offset"])
    if kind == "BatchNormalization":
        return _batch_norm(a, in_shape)
    if kind == "Activation":
        return None if activation is None else activation_module(activation)
    if kind in ("GlobalAveragePooling2D", "GlobalMaxPooling2D"):
        return GlobalPool2D("avg" if kind == "GlobalAveragePooling2D" else "max")
    return None  # InputLayer


def final_activation(specs: Sequence[LayerSpec]) -> tuple[str | None, int | None]:
    """The softmax/sigmoid that ends a model (Dense(activation=...) or a trailing Activation),
    and the index of the layer holding it; (None, None) when the model ends without one."""
    last = len(specs) - 1
    if last >= 0 and specs[last].kind in ("Dense", "Activation"):
        name = specs[last].args["activation"]
        if name in FINAL_ACTIVATIONS:
            return name, last
    return None, None


def _defer_activations_to_pools(modules: Sequence[nn.Module]) -> None:
    """Conv2D(activation=relu) then MaxPool2D: in training, ReLU runs after the pool."""
    for conv, pool in itertools.pairwise(modules):
        if (
            isinstance(conv, KerasConv2D)
            and isinstance(pool, KerasMaxPool2D)
            and conv.activation_name in POOL_COMMUTING_ACTIVATIONS
        ):
            conv.defer_activation = True
            pool.deferred_act = activation_module(conv.activation_name)


class LayerStack(nn.Sequential):
    """nn.Sequential that runs layers together as fused CPU kernels where it can
    (cnnlab.models.fused: a Conv2D on few channels and its MaxPool2D, a Conv2D, its MaxPool2D
    and the Dropout after them with the conv's gradients in C, a Conv2D and its MaxPool2D with
    the C gradients, a MaxPool2D and the Dropout after it), a 'same' Conv2D without the padding
    its MaxPool2D never reads, and every other layer as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules = list(self)
        i = 0
        if (prefix := chain.chain_prefix(self, modules, x)) is not None:
            x, i = prefix(x), prefix.modules
        while i < len(modules):
            module, following = modules[i], modules[i + 1] if i + 1 < len(modules) else None
            if (
                isinstance(module, KerasConv2D)
                and isinstance(following, KerasMaxPool2D)
                and fused.fusable(module, following)
                and fused.fusable_now(module, following, x)
            ):
                x, ran = self._conv_pool(modules, i, x)
                i += ran
            elif (fused_x := self._conv_pool_dropout(modules, i, x)) is not None:
                x = fused_x
                i += 3
            elif (
                isinstance(module, KerasConv2D)
                and isinstance(following, KerasMaxPool2D)
                and fused.pooled_grad_fits(module, following, x)
            ):
                x = fused.conv_then_pool(module, following, x)
                i += 2
            elif (
                isinstance(module, KerasMaxPool2D)
                and isinstance(following, KerasDropout)
                and fused.pool_dropout_fits(module, following, x)
            ):
                x = fused.pool_dropout(module, following, x)
                i += 2
            elif (head := self._dense_head(modules, i, x)) is not None:
                x, ran = head
                i += ran
            elif (
                isinstance(module, KerasConv2D)
                and x.dim() == 4
                and (pad := module.pad_for_pool(following, x.shape[2], x.shape[3])) is not None
                and fused.unwatched(module, module.act, following)
            ):
                x = module.forward_padded(F.pad(x, pad) if any(pad) else x)
                i += 1
            else:
                x = module(x)
                i += 1
        return x

    @staticmethod
    def _conv_pool(modules: list[nn.Module], i: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The fused conv-pool block at modules[i], and the conv after it where the kernel can
        write that conv's padding (`dropout`'s 2x2 'same' convs: a pad pass and a copy of its
        gradient less, training steps 1.01-1.04x); the output and how many modules ran."""
        after = modules[i + 2] if i + 2 < len(modules) else None
        pad = fused.bottom_right_pad(after) if isinstance(after, KerasConv2D) else None
        x = fused.conv_pool(modules[i], modules[i + 1], x, pad or (0, 0))
        if pad is None or not isinstance(after, KerasConv2D):
            return x, 2
        pool = modules[i + 3] if i + 3 < len(modules) else None
        if isinstance(pool, KerasMaxPool2D) and fused.pooled_grad_fits(after, pool, x):
            x = x[:, :, : x.shape[2] - pad[0], : x.shape[3] - pad[1]]  # conv_then_pool pads
            return x.contiguous(memory_format=torch.channels_last), 2
        fused_x = LayerStack._conv_pool_dropout(modules, i + 2, x, padded=True)
        if fused_x is not None:
            return fused_x, 5
        return after.forward_padded(x), 3

    @staticmethod
    def _dense_head(
        modules: list[nn.Module], i: int, x: torch.Tensor
    ) -> tuple[torch.Tensor, int] | None:
        """The Dense, optional Dropout and Dense at modules[i:] as one `fused.dense_head` where
        `dense_head_at` finds them: the output and how many modules ran; None elsewhere."""
        found = LayerStack.dense_head_at(modules, i, x)
        if found is None:
            return None
        first, dropout, second = found
        return fused.dense_head(first, dropout, second, x), 2 if dropout is None else 3

    @staticmethod
    def dense_head_at(
        modules: list[nn.Module], i: int, x: torch.Tensor
    ) -> tuple[KerasDense, KerasDropout | None, KerasDense] | None:
        """The Dense, optional Dropout and Dense at modules[i:] where `fused.dense_head_fits` x and
        the second Dense is small enough to run in float32 (FP32_DENSE_MAX_WEIGHTS); the first
        too, or under bf16 autocast with AVX512-BF16 in the kernels, where the head runs its
        products in bf16 as autocast would (`fused.dense_head_options`)."""
        first, dropout, second = [*modules[i : i + 3], None, None, None][:3]
        if not isinstance(dropout, KerasDropout):
            dropout, second = None, dropout
        if not (
            isinstance(first, KerasDense)
            and isinstance(second, KerasDense)
            and second.fp32_under_autocast
            and (first.fp32_under_autocast or fused.bf16_dense_head_fits())
            and fused.dense_head_fits(first, dropout, second, x)
        ):
            return None
        return first, dropout, second

    @staticmethod
    def _conv_pool_dropout(
        modules: list[nn.Module], i: int, x: torch.Tensor, padded: bool = False
    ) -> torch.Tensor | None:
        """The Conv2D, MaxPool2D and Dropout at modules[i : i + 3] as one
        `fused.conv_pool_dropout` where it fits, after the conv's uneven 'same' padding (less
        what the pool never reads) unless x is `padded` with it already; None elsewhere."""
        conv, pool, dropout = [*modules[i : i + 3], None, None, None][:3]
        if not (
            isinstance(conv, KerasConv2D)
            and isinstance(pool, KerasMaxPool2D)
            and isinstance(dropout, KerasDropout)
            and x.dim() == 4
        ):
            return None
        pad: Pad = (0, 0, 0, 0)
        if not padded:
            pad = conv.pad_for_pool(pool, x.shape[2], x.shape[3]) or conv.uneven_pad or pad
        if not fused.conv_pool_dropout_fits(conv, pool, dropout, x, pad):
            return None
        return fused.conv_pool_dropout(conv, pool, dropout, F.pad(x, pad) if any(pad) else x)


class CnnModel(nn.Module):
    """A CNN classifier built from a Keras-named layer spec; returns logits.

    A final softmax or sigmoid in the spec is not applied: `final_activation` records it and
    callers turn logits into probabilities with it (torch.softmax(logits, 1)), so it is never
    applied twice. Attributes: specs, input_shape (C, H, W), num_classes, final_activation,
    layer_names and output_shapes (channels first, one per spec).
    """

    def __init__(self, layers: Sequence[Any], input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.specs: tuple[LayerSpec, ...] = tuple(parse_spec(layers))
        self.input_shape: tuple[int, int, int] = _check_input_shape(input_shape)
        self.num_classes: int = _check_num_classes(num_classes)
        self.output_shapes: tuple[Shape, ...] = tuple(
            infer_shapes(self.specs, self.input_shape, self.num_classes)
        )
        self.layer_names: tuple[str, ...] = tuple(layer_names(self.specs))
        self.final_activation, stripped = final_activation(self.specs)
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        in_shape: Shape = self.input_shape
        for i, (spec, name) in enumerate(zip(self.specs, self.layer_names, strict=True)):
            module = _build_layer(spec, in_shape, strip_activation=i == stripped)
            if module is not None:
                blocks[name] = module
            in_shape = self.output_shapes[i]
        self.layers = LayerStack(blocks)
        _defer_activations_to_pools(list(blocks.values()))
        frozen = [
            blocks[name]
            for spec, name in zip(self.specs, self.layer_names, strict=True)
            if spec.args.get("trainable") is False and name in blocks
        ]
        for module in frozen:
            module.requires_grad_(False)
        # Keras 3: a frozen BatchNormalization always normalises with its moving statistics.
        self._frozen_norms = [m for m in frozen if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.train(self.training)

    def train(self, mode: bool = True) -> CnnModel:
        super().train(mode)
        for norm in getattr(self, "_frozen_norms", ()):
            norm.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, C, H, W) float -> (B, num_classes) logits

    def get_config(self) -> dict[str, Any]:
        """Everything needed to rebuild the model (JSON/YAML-friendly); see from_config."""
        return {
            "layers": spec_to_list(self.specs),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CnnModel:
        return cls(config["layers"], tuple(config["input_shape"]), config["num_classes"])


def build_model(
    layers: Sequence[Any], input_shape: tuple[int, int, int], num_classes: int
) -> CnnModel:
    """Build a CnnModel for images of `input_shape` (C, H, W) and `num_classes` classes."""
    return CnnModel(layers, input_shape, num_classes)


# ---------------------------------------------------------------------------------------------
# The Keras-flavoured Python API: each function checks its arguments and returns the dict form,
# so [Conv2D(32, (3, 3), activation="relu"), MaxPool2D(), Flatten(), Dense(10)] is a spec.


def _layer(kind: str, args: dict[str, Any]) -> LayerDict:
    _normalise(_ALIASES.get(kind, kind), args, kind)
    return {kind: args}


def Input(shape: Sequence[int], **kwargs: Any) -> LayerDict:
    """keras.Input(shape=(H, W, C)): optional; checked against the data's shape."""
    return _layer("Input", {"shape": shape, **kwargs})


def Conv2D(filters: int, kernel_size: int | Sequence[int], **kwargs: Any) -> LayerDict:
    return _layer("Conv2D", {"filters": filters, "kernel_size": kernel_size, **kwargs})


def MaxPool2D(pool_size: int | Sequence[int] = 2, **kwargs: Any) -> LayerDict:
    return _layer("MaxPool2D", {"pool_size": pool_size, **kwargs})


def MaxPooling2D(pool_size: int | Sequence[int] = 2, **kwargs: Any) -> LayerDict:
    return _layer("MaxPooling2D", {"pool_size": pool_size, **kwargs})


def AveragePooling2D(pool_size: int | Sequence[int] = 2, **kwargs: Any) -> LayerDict:
    return _layer("AveragePooling2D", {"pool_size": pool_size, **kwargs})


def AvgPool2D(pool_size: int | Sequence[int] = 2, **kwargs: Any) -> LayerDict:
    return _layer("AvgPool2D", {"pool_size": pool_size, **kwargs})


def Dropout(rate: float, **kwargs: Any) -> LayerDict:
    return _layer("Dropout", {"rate": rate, **kwargs})


def Flatten(**kwargs: Any) -> LayerDict:
    return _layer("Flatten", {**kwargs})


def Dense(units: int, **kwargs: Any) -> LayerDict:
    return _layer("Dense", {"units": units, **kwargs})


def Rescaling(scale: float, offset: float = 0.0, **kwargs: Any) -> LayerDict:
    return _layer("Rescaling", {"scale": scale, "offset": offset, **kwargs})


def BatchNormalization(**kwargs: Any) -> LayerDict:
    return _layer("BatchNormalization", {**kwargs})


def Activation(activation: str | None, **kwargs: Any) -> LayerDict:
    return _layer("Activation", {"activation": activation, **kwargs})


def GlobalAveragePooling2D(**kwargs: Any) -> LayerDict:
    return _layer("GlobalAveragePooling2D", {**kwargs})


def GlobalMaxPooling2D(**kwargs: Any) -> LayerDict:
    return _layer("GlobalMaxPooling2D", {**kwargs})
