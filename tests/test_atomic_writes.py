"""Atomic files: a process killed at any instant of a save loop leaves loadable files; a failed
write (full disk, no permission, Ctrl-C) leaves the previous version and no temp file."""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from cnnlab import fileio
from cnnlab.errors import WriteError
from cnnlab.inference import Preprocessing
from cnnlab.models import build_model
from cnnlab.training.checkpoint import (
    ModelInfo,
    load_checkpoint,
    load_model,
    save_checkpoint,
    save_weights,
)

LAYERS = [{"Conv2D": {"filters": 4, "kernel_size": 3}}, "Flatten", {"Dense": {"units": 3}}]


def version(i: int) -> dict:
    """Checkpoint number i: every tensor holds i, so a torn mix of two versions is detectable."""
    return {"loop": {"epoch": i}, "model": {"w": torch.full((64, 1024), float(i))}}


def save_all(folder: Path, model: torch.nn.Module, i: int) -> None:
    save_checkpoint(folder / "last.ckpt", version(i))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(i))
    info = ModelInfo(LAYERS, ("a", "b", "c"), Preprocessing((1, 8, 8)), epoch=i)
    save_weights(folder, model, info)
    fileio.write_text(folder / "metrics.csv", f"{i}\n" * 2000)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_9_in_a_tight_save_loop_always_leaves_loadable_files(tmp_path: Path) -> None:
    model = build_model(LAYERS, (1, 8, 8), 3)
    save_all(tmp_path, model, 0)
    rng = random.Random(0)
    newest = 0
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # the child saves new versions as fast as it can until killed
            try:
                i = newest + 1
                while True:
                    save_all(tmp_path, model, i)
                    i += 1
            finally:
                os._exit(1)  # only reached on an error: the parent then sees no SIGKILL
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WTERMSIG(status) == signal.SIGKILL
        checkpoint = load_checkpoint(tmp_path / "last.ckpt")
        epoch = checkpoint["loop"]["epoch"]
        assert torch.equal(checkpoint["model"]["w"], version(epoch)["model"]["w"])
        assert epoch >= newest
        loaded, info = load_model(tmp_path)
        values = {float(v) for p in loaded.parameters() for v in p.detach().flatten()}
        # Each save writes last.ckpt, then the weights, then model.json, so the weights are no
        # older than model.json and no newer than last.ckpt. (Not "at most one newer than
        # model.json": a child killed between last.ckpt and the weights leaves that version
        # unwritten, and the next child starts after it.)
        assert len(values) == 1 and info.epoch <= values.pop() <= epoch
        lines = set((tmp_path / "metrics.csv").read_text().splitlines())
        assert len(lines) == 1 and len((tmp_path / "metrics.csv").read_text()) > 0
        newest = epoch
        for tmp in tmp_path.glob(".*.tmp"):  # what a resume does with leftovers
            tmp.unlink()
    assert newest > 0, "the child never completed a save: the test proved nothing"


def test_a_full_disk_keeps_the_previous_version_and_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.ckpt"
    save_checkpoint(target, version(1))

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(WriteError, match=r"Disk full while writing .*last\.ckpt.*Free some space"):
        save_checkpoint(target, version(2))
    assert load_checkpoint(target)["loop"]["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_an_unwritable_folder_gives_a_write_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chmod 0o500 stops non-root users; as root (where it does not) mkstemp is made to fail."""
    folder = tmp_path / "out"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:

        def mkstemp(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(folder))

        monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
    try:
        with pytest.raises(WriteError, match=r"no permission to write in .*out.*writable"):
            fileio.write_text(folder / "config.yaml", "a: 1\n")
    finally:
        folder.chmod(0o700)
    assert not list(folder.iterdir())


def test_an_interrupted_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.csv"
    fileio.write_text(target, "old\n")
    with pytest.raises(KeyboardInterrupt), fileio.atomic_open(target, "w") as handle:
        handle.write("new, half written")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path: Path) -> None:
    target = tmp_path / "model.json"
    fileio.write_text(target, "{}")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
