"""Folder datasets: scanning, both layouts, stratified splits, the tensor cache and splits.csv."""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.data.folder import (
    LAYOUT_CLASSES,
    LAYOUT_SPLITS,
    FolderLoadInfo,
    load_folder,
    scan_folder,
    write_splits_csv,
)
from cnnlab.data.types import Dataset
from cnnlab.errors import DataError


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(path))
    return path


def write_png(path: Path, seed: int, size: tuple[int, int] = (8, 10), mode: str = "L") -> Path:
    """A small random image (H, W) = size, distinct for each seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = size if mode == "L" else (*size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, "PNG")
    return path


def make_classes(root: Path, counts: dict[str, int], **kwargs: object) -> Path:
    seed = 0
    for cls, n in counts.items():
        for i in range(n):
            seed += 1
            write_png(root / cls / f"img{i:03d}.png", seed, **kwargs)  # type: ignore[arg-type]
    return root


def load(root: Path, **kwargs: object) -> tuple[Dataset, FolderLoadInfo]:
    kwargs.setdefault("workers", 1)
    return load_folder(root, **kwargs)  # type: ignore[arg-type]


def image_of(dataset: Dataset, info: FolderLoadInfo, rel: str) -> torch.Tensor:
    """The decoded (C, H, W) image of one file, wherever the split put it."""
    for split, rows in info.splits.items():
        for i, (path, _) in enumerate(rows):
            if path == rel:
                return getattr(dataset, split).images[i]
    raise KeyError(rel)


def test_class_layout_loads_sorted_classes_and_ignores_hidden_files(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data", {"b": 5, "B": 5, "a": 5})
    (root / "a" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "a" / "Thumbs.db").write_bytes(b"\x00\x01")
    (root / "B" / "desktop.ini").write_text("[.ShellClassInfo]")
    write_png(root / ".ipynb_checkpoints" / "x.png", 99)  # a hidden folder is not a class
    write_png(root / "b" / "nested" / "deeper.png", 100)  # nested files belong to the class
    dataset, info = load(root, val_split=0.2, test_split=0.2)
    assert dataset.classes == ("B", "a", "b")  # plain string order, like Keras
    assert info.layout == LAYOUT_CLASSES and info.skipped == ()
    ignored = {rel for rel, _ in info.ignored}
    assert {"a/.DS_Store", "a/Thumbs.db", "B/desktop.ini", ".ipynb_checkpoints"} <= ignored
    assert dataset.train.images.dtype == torch.uint8
    assert dataset.input_shape == (1, 8, 10)  # all grayscale -> 1 channel, most common size
    all_rows = [row for rows in info.splits.values() for row in rows]
    assert len(all_rows) == 16 and ("b/nested/deeper.png", 2) in all_rows
    for split, image_set in (("train", dataset.train), ("val", dataset.val)):
        assert image_set is not None
        assert image_set.labels.tolist() == [label for _, label in info.splits[split]]
    first_rel, _ = info.splits["train"][0]
    expected = np.asarray(Image.open(root / first_rel))
    assert (dataset.train.images[0, 0].numpy() == expected).all()


def test_stratified_fraction_split_is_exact_and_seeded(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data", {"x": 10, "y": 20, "z": 30})
    _, info = load(root, val_split=0.2, test_split=0.1, seed=3)
    per = {s: Counter(label for _, label in rows) for s, rows in info.splits.items()}
    assert per["val"] == {0: 2, 1: 4, 2: 6} and per["test"] == {0: 1, 1: 2, 2: 3}
    assert per["train"] == {0: 7, 1: 14, 2: 21}
    _, again = load(root, val_split=0.2, test_split=0.1, seed=3, use_cache=False)
    assert again.splits == info.splits
    _, other = load(root, val_split=0.2, test_split=0.1, seed=4)
    assert other.splits["val"] != info.splits["val"]


def test_exact_duplicates_stay_in_one_split(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data", {"x": 20, "y": 20})
    original = (root / "x" / "img000.png").read_bytes()
    for i in range(4):
        (root / "x" / f"copy{i}.png").write_bytes(original)
    for seed in range(6):
        _, info = load(root, val_split=0.3, test_split=0.3, seed=seed)
        where = {rel: s for s, rows in info.splits.items() for rel, _ in rows}
        copies = {where[f"x/copy{i}.png"] for i in range(4)} | {where["x/img000.png"]}
        assert len(copies) == 1


def test_split_layout_is_used_as_given_and_missing_val_is_carved(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_classes(root / "train", {"cat": 10, "dog": 10})
    make_classes(root / "test", {"cat": 2, "dog": 3})
    dataset, info = load(root, val_split=0.2)
    assert info.layout == LAYOUT_SPLITS and dataset.classes == ("cat", "dog")
    assert all(rel.startswith("test/") for rel, _ in info.splits["test"])
    assert Counter(label for _, label in info.splits["test"]) == {0: 2, 1: 3}
    assert Counter(label for _, label in info.splits["val"]) == {0: 2, 1: 2}
    assert all(rel.startswith("train/") for rel, _ in info.splits["val"])
    assert dataset.test is not None and len(dataset.test) == 5
    make_classes(root / "valid", {"cat": 1, "dog": 1})
    dataset, info = load(root, val_split=0.2)
    assert [rel.split("/")[0] for rel, _ in info.splits["val"]] == ["valid", "valid"]
    assert len(dataset.train) == 20
    none_dataset, _ = load(root / "train", val_split=0.0, test_split=0.0)
    assert none_dataset.val is None and none_dataset.test is None


def test_structural_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "missing")
    single = make_classes(tmp_path / "single", {"only": 3})
    with pytest.raises(DataError, match="needs at least 2 classes"):
        load(single)
    empty_class = make_classes(tmp_path / "empty", {"cat": 3, "dog": 3})
    (empty_class / "bird").mkdir()
    (empty_class / "bird" / ".DS_Store").write_bytes(b"x")  # hidden files do not count
    with pytest.raises(DataError, match=r"Class folder .*bird is empty"):
        load(empty_class)
    nothing = tmp_path / "nothing"
    (nothing / "a").mkdir(parents=True)
    (nothing / "b").mkdir()
    with pytest.raises(DataError, match="No image files found"):
        load(nothing)
    flat = tmp_path / "flat"
    write_png(flat / "x.png", 1)
    with pytest.raises(DataError, match="one sub-folder per class"):
        load(flat)
    unreadable = tmp_path / "unreadable"
    for cls in ("a", "b"):
        (unreadable / cls).mkdir(parents=True)
        (unreadable / cls / "x.jpg").write_text("text")
    with pytest.raises(DataError, match=r"2 of 2 files .* non-image 2"):
        load(unreadable, max_bad_fraction=1.0)
    mixed = make_classes(tmp_path / "mixed", {"train/cat": 2, "train/dog": 2, "extra": 2})
    with pytest.raises(DataError, match="mixes split folders"):
        load(mixed)


def test_symlink_loop_does_not_hang_and_broken_links_are_skipped(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data", {"cat": 10, "dog": 10})
    os.symlink(root / "cat", root / "cat" / "loop")  # cat/loop -> cat
    os.symlink(root, root / "dog" / "up")  # dog/up -> the root
    os.symlink(tmp_path / "nowhere.png", root / "dog" / "broken.png")
    scan = scan_folder(root)
    assert len(scan.files) == 20
    assert {rel for rel, _ in scan.ignored} >= {"cat/loop", "dog/up"}
    assert [u.path for u in scan.unreadable] == ["dog/broken.png"]
    _, info = load(root)
    assert [(s.path, s.kind) for s in info.skipped] == [("dog/broken.png", "unreadable")]
    assert "broken symbolic link" in info.skipped[0].reason


def test_bad_files_are_skipped_until_too_many(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data", {"cat": 10, "dog": 10})
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("not an image")
    _, info = load(root, max_bad_fraction=0.1)
    assert {(s.path, s.kind) for s in info.skipped} == {
        ("cat/empty.jpg", "zero-byte"),
        ("dog/text.jpg", "non-image"),
    }
    assert sum(len(rows) for rows in info.splits.values()) == 20
    assert info.num_files == 22 and info.bad_fraction == pytest.approx(2 / 22)
    for i in range(10):
        (root / "cat" / f"img{i:03d}.png").write_bytes(b"GIF89a broken")
    with pytest.raises(DataError, match="No readable training images for class cat"):
        load(root, max_bad_fraction=1.0)
    with pytest.raises(DataError) as err:
        load(root, max_bad_fraction=0.5)
    message = str(err.value)
    assert "12 of 22 files" in message and "54.5%" in message
    assert "corrupt 10" in message and "zero-byte 1" in message and "--quarantine" in message


def test_default_size_color_and_explicit_settings(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(3):
        write_png(root / "a" / f"{i}.png", i, size=(6, 9))
    write_png(root / "b" / "0.png", 10, size=(6, 9), mode="RGB")
    write_png(root / "b" / "1.png", 11, size=(20, 20))
    dataset, info = load(root, val_split=0.0, test_split=0.0)
    assert info.image_size == (6, 9) and info.color_mode == "rgb"
    assert dataset.input_shape == (3, 6, 9) and "most common size 6x9" in info.size_rule
    dataset, info = load(root, image_size=(4, 4), color_mode="grayscale", resize="pad")
    assert dataset.input_shape == (1, 4, 4) and info.resize == "pad"
    big = tmp_path / "big"
    write_png(big / "a" / "0.png", 1, size=(600, 300))
    write_png(big / "b" / "0.png", 2, size=(600, 300))
    _, info = load(big, val_split=0.0, test_split=0.0)
    assert info.image_size == (256, 128) and info.color_mode == "grayscale"


def test_cache_hit_equal_and_invalidated_by_changes(tmp_path: Path, cache_dir: Path) -> None:
    root = make_classes(tmp_path / "data", {"cat": 6, "dog": 6})
    first, info1 = load(root)
    assert not info1.cache_hit and info1.cache_path is not None
    assert info1.cache_path.parent == cache_dir / "folders"
    with np.load(info1.cache_path, allow_pickle=False) as cached:
        assert cached["images"].dtype == np.uint8
    second, info2 = load(root)
    assert info2.cache_hit and info2.decode_seconds == 0.0
    assert torch.equal(first.train.images, second.train.images)
    assert info1.splits == info2.splits

    target = root / "cat" / "img000.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch only
    _, info3 = load(root)
    assert not info3.cache_hit
    write_png(target, 1234)  # new content
    third, info4 = load(root)
    assert not info4.cache_hit
    assert (image_of(third, info4, "cat/img000.png")[0] == np.array(Image.open(target))).all()
    write_png(root / "dog" / "new.png", 77)  # an added file
    _, info5 = load(root)
    assert not info5.cache_hit and info5.num_files == 13
    (root / "dog" / "new.png").unlink()  # a removed file
    _, info6 = load(root)
    assert not info6.cache_hit and info6.num_files == 12
    assert len(list((cache_dir / "folders").glob("*.npz"))) == 1  # stale entries are pruned
    assert list((cache_dir / "folders").glob(".*")) == []  # no temporary files left behind
    assert info6.cache_path is not None
    info6.cache_path.write_bytes(b"PK\x03\x04 not a real archive")  # a damaged cache file
    again, info_damaged = load(root)
    assert not info_damaged.cache_hit and len(again.train) == len(first.train)
    _, info7 = load(root, use_cache=False)
    assert not info7.cache_hit and info7.cache_path is None


def test_progress_bar_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_classes(tmp_path / "data", {"cat": 3, "dog": 3})
    load(root, progress=True, use_cache=False)
    err = capsys.readouterr().err
    assert "Reading headers" in err and "Decoding images" in err and "6/6" in err
    load(root, progress=False, use_cache=False)
    assert capsys.readouterr().err == ""


def test_parallel_decoding_matches_serial(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data", {"cat": 25, "dog": 25}, mode="RGB")
    serial, s_info = load(root, workers=1, use_cache=False)
    parallel, p_info = load(root, workers=2, use_cache=False)
    assert torch.equal(serial.train.images, parallel.train.images)
    assert s_info.splits == p_info.splits


def test_splits_csv_round_trip_and_mismatches(tmp_path: Path) -> None:
    root = make_classes(tmp_path / "data", {"cat": 10, "dog": 10})
    dataset, info = load(root, val_split=0.2, test_split=0.2, seed=1)
    splits_csv = write_splits_csv(info, tmp_path / "splits.csv")
    with splits_csv.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "split", "label"] and len(rows) == 21
    assert [
        "cat/img000.png",
        next(s for s, r in info.splits.items() if ("cat/img000.png", 0) in r),
        "cat",
    ] in rows
    again, reused = load(root, seed=99, val_split=0.5, splits_file=splits_csv)
    assert reused.splits == info.splits
    assert torch.equal(again.train.images, dataset.train.images)

    write_png(root / "dog" / "extra.png", 500)  # new file: left out, not fatal
    _, with_new = load(root, splits_file=splits_csv)
    assert with_new.unlisted == ("dog/extra.png",)

    (root / "cat" / "img003.png").unlink()
    with pytest.raises(DataError, match=r"no longer in .*cat/img003.png"):
        load(root, splits_file=splits_csv)
    write_png(root / "cat" / "img003.png", 3)
    make_classes(root, {"bird": 3})
    with pytest.raises(DataError, match=r"other classes.*bird"):
        load(root, splits_file=splits_csv)
