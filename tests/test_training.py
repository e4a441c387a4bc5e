import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import state_hash
from safetensors.torch import load_file

from cnnlab.config import RunConfig, TrainConfig
from cnnlab.inference import Preprocessing
from cnnlab.models import build_model, preset_layers
from cnnlab.training.checkpoint import load_checkpoint, load_model
from cnnlab.training.loop import Callback, NonFiniteLossError, Trainer
from cnnlab.training.optimizers import make_optimizer
from cnnlab.training.run import train_run


def make_trainer(squares, **train_overrides) -> Trainer:
    config = replace(TrainConfig(batch_size=16, lr=3e-3), **train_overrides)
    torch.manual_seed(0)
    model = build_model(preset_layers("tiny", 4), squares.shape, 4)
    prep = Preprocessing(input_shape=squares.shape)
    return Trainer(model, config, squares, squares, prep, seed=0)


def test_a_small_set_is_learned_to_100_percent(squares) -> None:
    trainer = make_trainer(squares, epochs=25, early_stopping=TrainConfig().early_stopping)
    history = trainer.fit()
    assert history[-1]["train_accuracy"] == 1.0
    assert max(row["val_accuracy"] for row in history) == 1.0


def test_early_stopping_stops_and_restores_best(squares) -> None:
    config = TrainConfig(batch_size=16, lr=3e-3, epochs=40)
    es = replace(config.early_stopping, patience=1, min_delta=10.0)  # nothing counts as better
    trainer = make_trainer(squares, epochs=40, early_stopping=es)
    history = trainer.fit()
    assert len(history) == 3  # epoch 1 is best, 2 and 3 fail to improve by min_delta
    assert "early stopping" in trainer.state.stop_reason
    assert trainer.state.best_epoch == 1


def test_non_finite_loss_stops_training(squares) -> None:
    trainer = make_trainer(squares, epochs=3, lr=1e6, optimizer="sgd", momentum=0.0)
    with pytest.raises(NonFiniteLossError, match="Lower the learning rate"):
        trainer.fit()


def test_nan_pixels_stop_training(squares, monkeypatch) -> None:
    """uint8 storage cannot hold NaN, so NaN is injected where batches become float."""
    from cnnlab.training import loop

    def poisoned(*args, **kwargs):
        batch = prepare_batch(*args, **kwargs)
        batch[0, 0, 0, 0] = float("nan")
        return batch

    prepare_batch = loop.prepare_batch
    monkeypatch.setattr(loop, "prepare_batch", poisoned)
    trainer = make_trainer(squares, epochs=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1"):
        trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_under_a_finite_loss_stops_before_the_update(squares, bad) -> None:
    trainer = make_trainer(squares, epochs=2)
    trainer.fit()  # a few good steps first: the fused optimizer path is taken by now
    trainer.config = replace(trainer.config, epochs=3)
    dense = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear))
    dense.weight.register_hook(lambda grad: grad * bad)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="a gradient became NaN or infinite"):
        trainer.fit()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_run_folder_holds_every_artifact(digits_config: RunConfig) -> None:
    result = train_run(digits_config)
    run = result.run_dir
    assert run.name == "train"
    for name in (
        "config.yaml",
        "metrics.csv",
        "best.safetensors",
        "model.json",
        "last.ckpt",
        "curves.png",
        "samples.png",
        "splits.csv",
    ):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(
        rows[0]
    )
    model, info = load_model(run)
    assert info.classes == tuple(str(d) for d in range(10))
    assert set(load_file(run / "best.safetensors")) == set(model.state_dict())
    checkpoint = load_checkpoint(run / "last.ckpt")
    assert checkpoint["loop"]["epoch"] == 2
    second = train_run(digits_config)
    assert second.run_dir.name == "train-2"


@pytest.fixture
def two_threads(digits_config: RunConfig) -> RunConfig:
    """A fixed thread count: the sums inside convolutions depend on it, and with threads=0
    training follows the cores other processes leave free (test_training_cores.py)."""
    return digits_config.with_overrides({"train.threads": 2})


def test_same_seed_gives_identical_weights(two_threads: RunConfig) -> None:
    first = train_run(two_threads)
    second = train_run(two_threads)
    assert state_hash(first.model.state_dict()) == state_hash(second.model.state_dict())
    other = train_run(replace(two_threads, seed=1))
    assert state_hash(other.model.state_dict()) != state_hash(first.model.state_dict())


def test_auto_threads_on_free_cores_give_identical_weights(
    digits_config: RunConfig, monkeypatch
) -> None:
    from cnnlab.training.cores import OtherProcessLoad

    monkeypatch.setattr(OtherProcessLoad, "read", lambda self: 0.0)  # nothing else running
    first = train_run(digits_config)
    second = train_run(digits_config)
    assert state_hash(first.model.state_dict()) == state_hash(second.model.state_dict())


def test_saved_config_repeats_the_run(two_threads: RunConfig) -> None:
    from cnnlab.config import load_config

    first = train_run(two_threads)
    repeat = train_run(load_config(first.run_dir / "config.yaml"))
    assert state_hash(first.model.state_dict()) == state_hash(repeat.model.state_dict())


class StopAfter(Callback):
    """Asks the trainer to stop after `steps` optimisation steps (as Ctrl-C does)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_batch_end(self, trainer, logs) -> None:
        if trainer.state.step == self.steps:
            trainer.stop_requested = True


@pytest.mark.parametrize("stop_step", [7, 23])  # mid-epoch 1, mid-epoch 2 (22 steps per epoch)
def test_resume_mid_epoch_is_exact(two_threads: RunConfig, stop_step: int) -> None:
    from cnnlab.training.run import TrainingInterrupted

    config = two_threads.with_overrides(
        {
            "train.epochs": 3,
            "data.augment.shift": 0.1,
            "data.augment.flip": True,
            "model.preset": "fast",
        }
    )
    straight = train_run(config)
    with pytest.raises(TrainingInterrupted, match="cnnlab train --resume"):
        train_run(config, callbacks=[StopAfter(stop_step)])
    interrupted_dir = Path(config.project) / "train-2"
    resumed = train_run(config, resume=interrupted_dir)
    assert state_hash(resumed.model.state_dict()) == state_hash(straight.model.state_dict())
    rows = list(csv.DictReader((interrupted_dir / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    straight_rows = list(csv.DictReader((straight.run_dir / "metrics.csv").open()))
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in straight_rows]


@pytest.mark.parametrize(
    ("name", "fused"),
    [("adam", True), ("adamw", True), ("sgd", True), ("adamax", False), ("rmsprop", False)],
)
def test_optimizers_use_fused_kernels_where_torch_has_them(name, fused):
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, TrainConfig(optimizer=name, momentum=0.9))
    assert bool(optimizer.defaults.get("fused")) is fused


def test_erasing_alone_is_applied_in_training(squares, monkeypatch) -> None:
    """Random erasing on its own (no shift, no flip) must still reach the training batches."""
    from cnnlab.data.transforms import Augment
    from cnnlab.training import loop

    seen: list[Augment] = []
    augment_batch = loop.augment_batch

    def recording(batch, aug, generator):
        seen.append(aug)
        return augment_batch(batch, aug, generator)

    monkeypatch.setattr(loop, "augment_batch", recording)
    config = TrainConfig(batch_size=16, lr=3e-3, epochs=1)
    model = build_model(preset_layers("tiny", 4), squares.shape, 4)
    prep = Preprocessing(input_shape=squares.shape)
    erase_only = Augment(erase=0.5)
    trainer = Trainer(model, config, squares, None, prep, augment=erase_only, seed=0)
    trainer.fit()
    assert seen and all(aug == erase_only for aug in seen)


def test_erasing_alone_gets_an_augmentation_preview(digits_config: RunConfig) -> None:
    result = train_run(digits_config.with_overrides({"train.epochs": 1, "data.augment.erase": 0.5}))
    assert (result.run_dir / "augmentation.png").is_file()
