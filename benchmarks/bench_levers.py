"""Each speed lever on and off, interleaved in one process, so machine load hits both sides.

Training steps (batch 128, random uint8 images, bf16 autocast where the CPU has AMX or
AVX512-BF16):
  - activation after the pool + fused Adam, against Keras' order + foreach Adam
  - dropout in C (a Philox mask drawn and applied in one pass), against torch.rand masks
  - dropout masks from torch.rand, against nn.Dropout (bernoulli_)
  - channels_last, against contiguous NCHW
  - GlobalMaxPooling2D as adaptive_max_pool2d, against amax
  - a conv's gradients from the max pool's winners in C (conv_then_pool: basic's weight
    gradient, tiny's weight and input gradients), against oneDNN's from the unpooled gradient
  - tiny's second conv (kernel rows of 24 values) through winners_backward, against the C
    weight and input gradients that sum over every window (pooled_weight_grad, pooled_input_grad)
  - tiny's head (Dense, Dropout, Dense) in one C call each way, against the modules
  - the first block in bf16 dot products under autocast, against its float32 kernel
  - basic's and dropout's heads in the C call with the first Dense in bf16 dot products,
    against the modules (oneDNN's bf16 matrix products)
  - the gradients from the pool's winners by union rows and in bf16 dot products
    (fused.WINNERS_METHODS), against position by position; and in bf16 dot products alone,
    against union rows
  - the first fused blocks as one autograd Function (cnnlab.models.chain), against the blocks
    one by one; every other training lever is measured with the blocks one by one
  - a whole-model chain's step without an autograd graph, its loss and gradient check in C
    (cnnlab.training.gradients), against the chain as an autograd Function
  - fast's frozen whitening first conv (no BatchNorm), against a trained conv + BatchNorm
  - optimizer steps through cnnlab's Updater, against torch.optim's zero_grad and step
Evaluation (4,096 images a round, batch 256, twice as many rounds as training):
  - bf16 autocast against fp32
  - max pooling by tile_max, against max_pool2d
  - BatchNorm folded into the conv before it, against BatchNorm run as a layer
  - a conv's activation applied after the max pool that follows it, against Keras' order
  - batches on one-core worker threads, against every op split over all cores

With --real-data, each training step's model first trains 200 steps on Fashion-MNIST, then
steps on its batches in turn: a trained net's activations (how many ReLUs are dead, how many of
a pool's winners have a gradient) decide how much work the winners' gradients take.

    .venv/bin/python benchmarks/bench_levers.py
    .venv/bin/python benchmarks/bench_levers.py --presets basic --rounds 9
    .venv/bin/python benchmarks/bench_levers.py --presets basic dropout --real-data --training-only
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, table

import cnnlab.inference
import cnnlab.models.folding
from cnnlab.benchmark import Stepper
from cnnlab.inference import Preprocessing, predict_logits
from cnnlab.models import (
    Activation,
    BatchNormalization,
    Conv2D,
    MaxPool2D,
    chain,
    fused,
    preset_layers,
)
from cnnlab.models.folding import inference_copy
from cnnlab.models.layers import GlobalPool2D, KerasConv2D, KerasDropout, KerasMaxPool2D
from cnnlab.training import gradients
from cnnlab.training.optimizers import Updater

SHAPE = (1, 28, 28)
CPU = torch.device("cpu")
EVAL_IMAGES = 4096


def variant(
    preset: str,
    *,
    keras_order: bool = False,
    foreach: bool = False,
    bernoulli: bool = False,
    rand_dropout: bool = False,
    nchw: bool = False,
    amax: bool = False,
    trained_stem: bool = False,
    onednn_conv_grads: bool = False,
    torch_optim_steps: bool = False,
    pad_pass: bool = False,
    whole_vector_winners: bool = False,
    module_head: bool = False,
    fp32_first_block: bool = False,
    onednn_head: bool = False,
    per_block: bool = False,
    autograd_step: bool = False,
) -> Stepper:
    """The preset's training step (as `cnnlab bench` times it) with the named levers off."""
    layers = None
    if trained_stem:  # fast's former first block: a trained 24-filter conv, BatchNorm, ReLU
        stem = [
            Conv2D(24, (3, 3), padding="same", use_bias=False),
            MaxPool2D((2, 2), padding="same"),
            BatchNormalization(momentum=0.9),
            Activation("relu"),
        ]
        layers = stem + preset_layers(preset, 10)[2:]
    stepper = Stepper(preset, SHAPE, 128, CPU, amp=True, channels_last=not nchw, layers=layers)
    if keras_order:
        for module in stepper.model.modules():
            if isinstance(module, KerasConv2D):
                module.defer_activation = False
            if isinstance(module, KerasMaxPool2D):
                module.deferred_act = None
    if bernoulli:
        for name, module in list(stepper.model.layers.named_children()):
            if isinstance(module, KerasDropout):
                setattr(stepper.model.layers, name, nn.Dropout(module.p))
    if rand_dropout:  # KerasDropout's path where the C kernels are not built
        for module in stepper.model.modules():
            if isinstance(module, KerasDropout):
                module.forward = functools.partial(rand_dropout_forward, module)  # type: ignore[method-assign]
    if amax:
        for module in stepper.model.modules():
            if isinstance(module, GlobalPool2D) and module.mode == "max":
                module.forward = lambda x: x.amax(dim=(2, 3))  # type: ignore[method-assign]
    if foreach:
        stepper.optimizer = torch.optim.Adam(stepper.model.parameters(), lr=1e-3, foreach=True)
        stepper.updater = Updater(stepper.optimizer)
    if torch_optim_steps:
        stepper.updater = TorchOptimSteps(stepper.optimizer)  # type: ignore[assignment]
    if onednn_conv_grads:  # the gates are module settings: closed for this stepper's steps only
        stepper.step = functools.partial(without_conv_then_pool, stepper.step)  # type: ignore[method-assign]
    if pad_pass:  # the next conv pads its input itself (F.pad), as before the fourteenth session
        stepper.step = functools.partial(  # type: ignore[method-assign]
            patched_step, fused, "bottom_right_pad", lambda conv: None, stepper.step
        )
    if whole_vector_winners:  # winners_backward as before the twenty-first session
        stepper.step = functools.partial(  # type: ignore[method-assign]
            patched_step,
            fused,
            "winners_fit",
            on_whole_vectors(fused.winners_fit),
            stepper.step,
        )
    if module_head:  # Dense, Dropout and Dense as modules, as before the twenty-second session
        stepper.step = functools.partial(  # type: ignore[method-assign]
            patched_step, fused, "dense_head_fits", lambda *args: False, stepper.step
        )
    if fp32_first_block:  # the first block's float32 kernel, as before the twenty-fourth session
        stepper.step = functools.partial(  # type: ignore[method-assign]
            patched_step, fused, "first_block_in_pairs", lambda *args: False, stepper.step
        )
    if onednn_head:  # a large first Dense left to the modules, as before the twenty-fourth session
        stepper.step = functools.partial(  # type: ignore[method-assign]
            patched_step, fused, "bf16_dense_head_fits", lambda: False, stepper.step
        )
    if per_block:  # each fused block its own Function, as before the twenty-third session
        stepper.step = functools.partial(  # type: ignore[method-assign]
            patched_step, chain, "chain_prefix", lambda *args: None, stepper.step
        )
    if autograd_step:  # whole-model chains through autograd, as before the 26th session
        stepper.step = functools.partial(  # type: ignore[method-assign]
            patched_step, gradients, "whole_model_chain", lambda *args: None, stepper.step
        )
    return stepper


class TorchOptimSteps:
    """An Updater's zero_grad and step as torch.optim runs them."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()


def without_conv_then_pool(step: Callable[[], object]) -> object:
    """A step with oneDNN's conv gradients: no conv_then_pool, no conv_pool_dropout."""
    min_run, max_shifted = fused.MIN_RUN, fused.MAX_SHIFTED_BYTES
    conv_pool_dropout_fits = fused.conv_pool_dropout_fits
    fused.MIN_RUN, fused.MAX_SHIFTED_BYTES = sys.maxsize, 0
    fused.conv_pool_dropout_fits = lambda *args, **kwargs: False
    try:
        return step()
    finally:
        fused.MIN_RUN, fused.MAX_SHIFTED_BYTES = min_run, max_shifted
        fused.conv_pool_dropout_fits = conv_pool_dropout_fits


def patched_step(owner: object, name: str, value: object, step: Callable[[], object]) -> object:
    """step() with owner.name set to value, restored afterwards."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        return step()
    finally:
        setattr(owner, name, original)


def on_whole_vectors(winners_fit: Callable[..., bool]) -> Callable[..., bool]:
    """winners_fit for convs on whole vectors of input channels only."""
    return lambda conv, pool: conv.in_channels % 16 == 0 and winners_fit(conv, pool)


def rand_dropout_forward(module: KerasDropout, x: torch.Tensor) -> torch.Tensor:
    if not module.training:
        return x
    return x * (torch.rand(x.shape) >= module.p) * (1.0 / (1.0 - module.p))


def interleaved_ms(
    fns: dict[str, Callable[[], object]], repeat: int, rounds: int
) -> dict[str, float]:
    """Median milliseconds per call of each function, rounds alternating between them."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - started) / repeat * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


class RealBatches:
    """Fashion-MNIST training batches of 128, in a fixed order, for Stepper steps."""

    WARM_UP_STEPS = 200

    def __init__(self) -> None:
        from cnnlab.data import load_dataset

        train = load_dataset("fashion-mnist").train
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        self.batches = [
            (train.images.index_select(0, idx), train.labels.index_select(0, idx))
            for idx in order[: 64 * 128].split(128)
        ]

    def drive(self, stepper: Stepper) -> Stepper:
        """The stepper training on these batches in turn, after WARM_UP_STEPS of them."""
        step, position = stepper.step, [0]

        def real_step() -> None:
            stepper.images, stepper.labels = self.batches[position[0] % len(self.batches)]
            position[0] += 1
            step()

        stepper.step = real_step  # type: ignore[method-assign]
        for _ in range(self.WARM_UP_STEPS):
            stepper.step()
        return stepper


def training_rows(preset: str, rounds: int, data: RealBatches | None = None) -> list[list[str]]:
    pairs = [
        ("activation after pool + fused Adam", {}, {"keras_order": True, "foreach": True}),
        ("dropout in C", {}, {"rand_dropout": True}),
        ("dropout masks from torch.rand", {"rand_dropout": True}, {"bernoulli": True}),
        ("channels_last", {}, {"nchw": True}),
        ("global max pool by adaptive_max_pool2d", {}, {"amax": True}),
        ("frozen whitening conv, no BatchNorm, as first block", {}, {"trained_stem": True}),
        ("conv gradients from the pool's winners in C", {}, {"onednn_conv_grads": True}),
        ("optimizer steps by the Updater", {}, {"torch_optim_steps": True}),
        ("first block writes the next conv's padding", {}, {"pad_pass": True}),
        ("winners' gradients on rows of part vectors", {}, {"whole_vector_winners": True}),
        ("Dense, Dropout, Dense in one C call each way", {}, {"module_head": True}),
        ("chain: the first fused blocks as one Function", {}, {"per_block": True}),
        ("whole-model chain stepped without autograd (StepProgram)", {}, {"autograd_step": True}),
        ("first block in bf16 dot products", {}, {"fp32_first_block": True}),
        ("first Dense of the C head in bf16 dot products", {}, {"onednn_head": True}),
        # fused.WINNERS_MAX_METHOD on one model (0: as before the twenty-fifth session)
        ("winners' gradients by union rows and in bf16", {}, {"winners_method": 0}),
        ("winners' gradients in bf16 (against union rows)", {}, {"winners_method": 1}),
    ]
    rows = []
    for lever, on, off in pairs:
        if lever.startswith("dropout") and preset not in ("tiny", "dropout"):
            continue
        if lever.startswith(("global", "frozen")) and preset != "fast":
            continue
        if lever.startswith("conv gradients") and preset not in ("tiny", "basic", "dropout"):
            continue
        if lever.startswith("first block writes") and preset != "dropout":
            continue
        if lever.startswith(("winners' gradients on", "Dense,")) and preset != "tiny":
            continue
        by_method = lever.startswith(("winners' gradients by", "winners' gradients in"))
        if by_method and preset not in ("basic", "dropout"):
            continue
        if lever.startswith(("chain", "whole-model")) and preset not in (
            "tiny",
            "basic",
            "dropout",
        ):
            continue
        if lever.startswith("first block in") and preset not in ("basic", "dropout", "fast"):
            continue
        if lever.startswith("first Dense") and preset not in ("basic", "dropout"):
            continue
        if lever.startswith("dropout") and preset == "tiny":  # its Dropout is in the C head:
            on, off = {**on, "module_head": True}, {**off, "module_head": True}  # as modules
        if not lever.startswith(("chain", "whole-model")):  # each on its own: blocks one by one
            on, off = {**on, "per_block": True}, {**off, "per_block": True}
        kept = variant(preset, **on)
        kept = data.drive(kept) if data is not None else kept
        if set(off) - set(on) == {"winners_method"}:  # a module setting: one model, both ways
            method = off["winners_method"]
            base_step = functools.partial(
                patched_step, fused, "WINNERS_MAX_METHOD", method, kept.step
            )
        else:
            base = variant(preset, **off)
            base_step = (data.drive(base) if data is not None else base).step
        ms = interleaved_ms({"on": kept.step, "off": base_step}, repeat=10, rounds=rounds)
        rows.append(_row(preset, f"train step: {lever}", ms["off"], ms["on"], "ms"))
    return rows


def evaluation_rows(preset: str, rounds: int) -> list[list[str]]:
    model = variant(preset).model.eval()
    images = torch.randint(0, 256, (EVAL_IMAGES, *SHAPE), dtype=torch.uint8)
    prep = Preprocessing(SHAPE)

    def evaluate(amp: bool) -> None:
        predict_logits(model, images, prep, amp=amp)

    pools = [m for m in model.modules() if isinstance(m, KerasMaxPool2D)]

    def evaluate_with_max_pool2d() -> None:
        for pool in pools:
            pool.tiled = False  # the general path: max_pool2d, which also builds indices
        try:
            evaluate(True)
        finally:
            for pool in pools:
                pool.tiled = True

    ms = interleaved_ms(
        {"bf16": lambda: evaluate(True), "fp32": lambda: evaluate(False)}, 1, 2 * rounds
    )
    rows = [_row(preset, "evaluation: bf16 autocast", ms["fp32"], ms["bf16"], "images/s")]
    if torch.get_num_threads() > 1:
        workers = interleaved_ms(
            {
                "workers": lambda: evaluate(True),
                "ops": lambda: predict_logits(model, images, prep, amp=True, threads=1),
            },
            1,
            2 * rounds,
        )
        lever = "evaluation: batches on one-core worker threads"
        rows.append(_row(preset, lever, workers["ops"], workers["workers"], "images/s"))
    if pools:
        pooled = interleaved_ms(
            {"tile_max": lambda: evaluate(True), "max_pool2d": evaluate_with_max_pool2d},
            1,
            2 * rounds,
        )
        lever = "evaluation: max pooling by tile_max"
        rows.append(_row(preset, lever, pooled["max_pool2d"], pooled["tile_max"], "images/s"))
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):

        def evaluate_unfolded() -> None:
            fold = cnnlab.models.folding.fold_batchnorm
            cnnlab.models.folding.fold_batchnorm = lambda m: m  # type: ignore[assignment]
            try:
                evaluate(True)
            finally:
                cnnlab.models.folding.fold_batchnorm = fold

        folds = interleaved_ms(
            {"folded": lambda: evaluate(True), "layer": evaluate_unfolded}, 1, 2 * rounds
        )
        lever = "evaluation: BatchNorm folded into the conv"
        rows.append(_row(preset, lever, folds["layer"], folds["folded"], "images/s"))
    if any(isinstance(m, KerasConv2D) and m.defer_activation for m in model.modules()):

        def evaluate_in_keras_order() -> None:
            cnnlab.inference.inference_copy = functools.partial(  # type: ignore[assignment]
                inference_copy, defer_activations=False
            )
            try:
                evaluate(True)
            finally:
                cnnlab.inference.inference_copy = inference_copy

        order = interleaved_ms(
            {"after": lambda: evaluate(True), "keras": evaluate_in_keras_order}, 1, 2 * rounds
        )
        lever = "evaluation: activation after the max pool"
        rows.append(_row(preset, lever, order["keras"], order["after"], "images/s"))
    return rows


def _row(preset: str, lever: str, off_ms: float, on_ms: float, unit: str) -> list[str]:
    if unit == "images/s":
        off, on = f"{EVAL_IMAGES / off_ms * 1e3:,.0f}", f"{EVAL_IMAGES / on_ms * 1e3:,.0f}"
    else:
        off, on = f"{off_ms:.2f} ms", f"{on_ms:.2f} ms"
    return [preset, lever, off, on, f"{off_ms / on_ms:.2f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "basic", "dropout", "fast"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--real-data", action="store_true", help="train on Fashion-MNIST")
    parser.add_argument("--training-only", action="store_true", help="no evaluation rows")
    args = parser.parse_args()
    print(machine_line())
    data = RealBatches() if args.real_data else None
    rows = []
    for preset in args.presets:
        rows += training_rows(preset, args.rounds, data)
        if not args.training_only:
            rows += evaluation_rows(preset, args.rounds)
    print(table(["preset", "lever", "off", "on", "speed-up"], rows))


if __name__ == "__main__":
    main()
