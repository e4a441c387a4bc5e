"""A corpus of bad inputs for every command: each ends with exit code 2, one `error:` paragraph
naming the problem and the fix, and no traceback (`--debug` raises it instead)."""

from __future__ import annotations

import errno
import os
import pathlib
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import fileio
from cnnlab.cli import main
from cnnlab.config import RunConfig
from cnnlab.errors import CheckpointError
from cnnlab.training.run import train_run


class Payload:
    """Unpickling this calls exec, which would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def png_bomb(path: Path, side: int = 100_000) -> None:
    """A valid PNG signature and header declaring side x side pixels, with a tiny body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    torch.set_num_threads(1)
    config = RunConfig.from_dict(
        {
            "project": str(root / "runs"),
            "data": {"dataset": "digits", "limit": 120, "val_split": 0.2},
            "model": {"preset": "fast"},
            "train": {"epochs": 1, "batch_size": 16, "threads": 1},
        }
    )
    return train_run(config).run_dir


@pytest.fixture
def run(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run, free to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "folder").mkdir()
    (d / "notes.txt").write_text("just text\n")
    (d / "notes.png").write_text("text pretending to be a PNG\n")
    (d / "wrong_type.yaml").write_text("train:\n  epochs: ten\n")
    (d / "unknown_key.yaml").write_text("train:\n  epoch: 3\n")
    (d / "not_yaml.yaml").write_text("train: [epochs: 3\n")
    (d / "bad_layer_args.yaml").write_text("- Conv2D: {filters: -3, kernel_size: 3}\n- Dense: 10\n")
    (d / "bad_layer_name.yaml").write_text("- Conv2D: {filters: 8, kernel_size: 3}\n- Flaten\n")
    png_bomb(d / "bomb.png")
    return d


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_clear_error(code: int, err: str, pattern: str) -> None:
    import re

    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert re.search(pattern, errors[0]), errors[0]


DIGITS = ["--dataset", "digits", "--limit", "60", "--threads", "1", "--quiet"]

CORPUS = {
    # train: configs and flags
    "config missing": (["train", "--config", "{c}/nowhere.yaml"], "does not exist"),
    "config is a folder": (["train", "--config", "{c}/folder"], "is a folder, not a YAML"),
    "config wrong type": (["train", "--config", "{c}/wrong_type.yaml"], "must be an integer"),
    "config unknown key": (["train", "--config", "{c}/unknown_key.yaml"], "Did you mean 'epochs'"),
    "config not yaml": (["train", "--config", "{c}/not_yaml.yaml"], "not valid YAML"),
    "config is text": (["train", "--config", "{c}/notes.txt"], "expected a mapping"),
    "epochs zero": (["train", *DIGITS, "--epochs", "0"], "epochs must be positive"),
    "epochs negative": (["train", *DIGITS, "--epochs", "-3"], "epochs must be positive"),
    "batch zero": (["train", *DIGITS, "--batch-size", "0"], "batch_size must be positive"),
    "batch > data": (["train", *DIGITS, "--batch-size", "4096"], "larger than the 54 train"),
    "set unknown key": (["train", "--set", "train.epohcs=3"], "Did you mean 'epochs'"),
    "set bad value": (["train", "--set", "train.lr=fast"], "train.lr must be a number"),
    "data missing": (["train", "--data", "{c}/nowhere"], "does not exist"),
    "data is a file": (["train", "--data", "{c}/notes.txt"], "is a file, not a folder"),
    "data has no classes": (["train", "--data", "{c}/folder"], "No class folders"),
    "model bad args": (
        ["train", *DIGITS, "--batch-size", "8", "--model", "{c}/bad_layer_args.yaml"],
        "filters must be a positive",
    ),
    "model unknown layer": (
        ["train", *DIGITS, "--batch-size", "8", "--model", "{c}/bad_layer_name.yaml"],
        "Did you mean 'Flatten'",
    ),
    "model file missing": (["train", *DIGITS, "--model", "{c}/none.yaml"], "does not exist"),
    "project is a file": (
        ["train", *DIGITS, "--batch-size", "8", "--project", "{c}/notes.txt"],
        "Cannot create the runs folder",
    ),
    # train --resume
    "resume missing": (["train", "--resume", "{c}/nowhere"], "does not exist"),
    "resume a file": (["train", "--resume", "{c}/notes.txt"], "is a file"),
    "resume not a run": (["train", "--resume", "{c}/folder"], "not a cnnlab run folder"),
    "resume finished": (["train", "--resume", "{r}"], "already finished"),
    # evaluate
    "evaluate missing": (["evaluate", "{c}/nowhere"], "does not exist"),
    "evaluate a file": (["evaluate", "{c}/notes.txt"], "is a file"),
    "evaluate not a run": (["evaluate", "{c}/folder"], "not a cnnlab run folder"),
    # predict
    "predict run missing": (["predict", "{c}/nowhere", "{c}/notes.png"], "does not exist"),
    "predict image missing": (["predict", "{r}", "{c}/none.png"], "does not exist"),
    "predict text file": (["predict", "{r}", "{c}/notes.txt"], "No image could be read.*PNG"),
    "predict text as png": (["predict", "{r}", "{c}/notes.png"], "No image could be read"),
    "predict image bomb": (["predict", "{r}", "{c}/bomb.png"], "No image could be read"),
    "predict empty folder": (["predict", "{r}", "{c}/folder"], "No image files found"),
    "predict top-k zero": (["predict", "{r}", "{c}/notes.png", "--top-k", "0"], "--top-k must"),
    # summary and datasets
    "summary bad model": (
        ["summary", "--model", "{c}/bad_layer_args.yaml", "--input-shape", "28,28,1"],
        "filters must be a positive",
    ),
    "summary bad shape": (["summary", "--input-shape", "28,28"], "--input-shape must be H,W,C"),
    "summary zero classes": (
        ["summary", "--input-shape", "28,28,1", "--classes", "0"],
        "num_classes must be a positive",
    ),
    "summary model folder": (
        ["summary", "--model", "{c}/folder", "--input-shape", "28,28,1"],
        "does not exist",
    ),
    "datasets dir missing": (["datasets", "--data-dir", "{c}/nowhere"], "does not exist"),
    "datasets dir a file": (["datasets", "--data-dir", "{c}/notes.txt"], "is a file"),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_bad_input_corpus(case: str, corpus: Path, finished_run: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(corpus)
    args, pattern = CORPUS[case]
    code, err = run_cli(capsys, *(a.format(c=corpus, r=finished_run) for a in args))
    assert_clear_error(code, err, pattern)
    if case in ("predict text file", "predict text as png", "predict image bomb"):
        assert "skipped" in err  # each unreadable image is listed with its reason


def test_image_bomb_is_refused_before_decoding(corpus: Path, finished_run: Path, capsys) -> None:
    code, err = run_cli(capsys, "predict", finished_run, corpus / "bomb.png")
    assert code == 2 and "bomb.png" in err and "pixels" in err.lower()


def test_debug_shows_the_traceback(corpus: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        main(["--debug", "evaluate", str(corpus / "nowhere")])


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "bit-flipped":  # one bit in the middle of the tensor data
        data[len(data) * 2 // 3] ^= 0x04
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["empty", "truncated", "bit-flipped"])
def test_damaged_weights_are_refused_naming_the_file(run: Path, how: str, capsys) -> None:
    damage(run / "best.safetensors", how)
    code, err = run_cli(capsys, "evaluate", run)
    assert_clear_error(code, err, r"best\.safetensors.*(empty|corrupt)")
    code, err = run_cli(capsys, "predict", run, run / "samples.png")
    assert_clear_error(code, err, r"best\.safetensors")


@pytest.mark.parametrize("how", ["empty", "truncated", "bit-flipped"])
def test_damaged_checkpoints_are_refused_naming_the_file(run: Path, how: str, capsys) -> None:
    damage(run / "last.ckpt", how)
    code, err = run_cli(capsys, "train", "--resume", run)
    assert_clear_error(code, err, r"last\.ckpt.*(empty|corrupt)")


def test_a_checkpoint_of_an_unknown_pickle_protocol_is_refused_without_torchs_warning(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    from cnnlab.training.checkpoint import load_checkpoint

    path = tmp_path / "last.ckpt"
    path.write_bytes(b"\x80\xd1" + bytes(range(40)))  # what damage can look like: protocol 209
    with pytest.raises(CheckpointError, match=r"last\.ckpt"):
        load_checkpoint(path)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_corrupt_model_json_is_named(run: Path, capsys) -> None:
    (run / "model.json").write_text('{"layers": [')
    code, err = run_cli(capsys, "evaluate", run)
    assert_clear_error(code, err, r"model\.json is corrupt")


def test_a_pickle_payload_checkpoint_is_refused_and_never_runs(
    run: Path, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "marker"
    torch.save({"loop": Payload(marker), "model": {}}, run / "last.ckpt")
    code, err = run_cli(capsys, "train", "--resume", run)
    assert_clear_error(code, err, r"Refusing to load checkpoint .*last\.ckpt.*could run code")
    assert not marker.exists()
    # the same payload dressed as weights
    (run / "best.safetensors").write_bytes((run / "last.ckpt").read_bytes())
    code, err = run_cli(capsys, "evaluate", run)
    assert_clear_error(code, err, r"best\.safetensors is corrupt")
    assert not marker.exists()


def test_a_pickle_payload_cifar_batch_is_refused_and_never_runs(tmp_path: Path, capsys) -> None:
    from cnnlab.data.cifar import CIFAR10_LAYOUT

    folder = tmp_path / "data" / CIFAR10_LAYOUT.folder
    folder.mkdir(parents=True)
    marker = tmp_path / "marker"
    for name in CIFAR10_LAYOUT.files:
        (folder / name).write_bytes(pickle.dumps({"data": Payload(marker), "labels": [0]}))
    code, err = run_cli(
        capsys, "train", "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--quiet"
    )
    assert_clear_error(code, err, "data_batch_1")
    assert not marker.exists()


def test_resume_with_the_data_gone_says_what_to_restore(tmp_path: Path, capsys) -> None:
    data = tmp_path / "photos"
    for k, name in enumerate(("cat", "dog")):
        (data / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.full((8, 8, 3), 40 * k + i, dtype=np.uint8)
            Image.fromarray(pixels).save(data / name / f"{i}.png")
    config = RunConfig.from_dict(
        {
            "project": str(tmp_path / "runs"),
            "data": {"path": str(data), "dataset": "folder", "val_split": 0.25},
            "model": {"preset": "fast"},
            "train": {"epochs": 2, "batch_size": 4, "threads": 1},
        }
    )
    run_dir = train_run(config).run_dir
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    checkpoint["loop"]["epoch"] = 1  # as if killed after epoch 1
    from cnnlab.training.checkpoint import save_checkpoint

    save_checkpoint(run_dir / "last.ckpt", checkpoint)
    shutil.rmtree(data)
    code, err = run_cli(capsys, "train", "--resume", run_dir)
    assert_clear_error(code, err, r"Cannot resume .*data is not available.*Put the data back")


def test_a_read_only_output_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """chmod 0o500; as root (which ignores it) mkdir and mkstemp there are made to fail."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    if os.geteuid() == 0:
        real_mkdir = pathlib.Path.mkdir

        def mkdir(self, *args, **kwargs):
            if read_only in (self, *self.parents) and self != read_only:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    try:
        code, err = run_cli(
            capsys, "train", *DIGITS, "--batch-size", "8", "--project", read_only / "runs"
        )
    finally:
        read_only.chmod(0o700)
    assert_clear_error(code, err, r"runs.*(permission|Permission).*--project")


def test_a_full_disk(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every write inside fileio fails with ENOSPC, as on a full disk."""
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle) -> None:
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

        def fileno(self) -> int:
            return self.handle.fileno()

        def flush(self) -> None:
            self.handle.flush()

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    code, err = run_cli(
        capsys, "train", *DIGITS, "--batch-size", "8", "--project", tmp_path / "runs"
    )
    assert_clear_error(code, err, r"Disk full while writing .*config\.yaml.*Free some space")
    assert not [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
