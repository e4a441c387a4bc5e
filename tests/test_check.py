"""The dataset check on a folder holding every kind of bad file, and the quarantine."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.data.check import (
    NEAR_DUPLICATE_MAX_DISTANCE,
    check_folder,
    hamming,
    near_duplicate_pairs,
    perceptual_hash,
    quarantine,
    thumbnail,
)
from cnnlab.data.folder import load_folder
from cnnlab.errors import DataError

UNUSABLE = {
    "train/cat/zero.jpg": "zero-byte",
    "train/cat/text.jpg": "non-image",
    "train/cat/truncated.jpg": "truncated",
    "train/cat/bomb.png": "over-size",
    "train/dog/scan.png": "unsupported-format",
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("CNNLAB_CACHE_DIR", str(path))
    return path


def smooth_image(seed: int, size: int = 32) -> Image.Image:
    """A smooth colour picture (random 4x4 blown up), distinct for each seed."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB")
    return small.resize((size, size), Image.Resampling.BICUBIC)


def save(img: Image.Image, path: Path, fmt: str = "PNG", **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kwargs)
    return path


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def build_zoo(root: Path) -> Path:
    """A split-layout folder with every kind of bad, odd and duplicated file."""
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                save(
                    smooth_image(1000 * c + 100 * len(split) + i), root / split / cls / f"s{i}.png"
                )
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    # unusable files
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "text.jpg").write_text("a text file with a .jpg name")
    jpeg = io.BytesIO()
    noise = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, "JPEG")
    (cat / "truncated.jpg").write_bytes(jpeg.getvalue()[:1500])
    (cat / "bomb.png").write_bytes(png_header_only(20000, 20000))
    save(smooth_image(7), dog / "scan.png", "TIFF")
    # odd but usable modes
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[5:15, 5:15] = (255, 0, 0, 255)
    save(Image.fromarray(rgba, "RGBA"), cat / "rgba.png")
    save(Image.new("CMYK", (20, 20), (0, 200, 200, 0)), cat / "cmyk.jpg", "JPEG")
    deep = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 160).astype(np.uint16)
    save(Image.fromarray(deep), cat / "deep16.png")
    palette = smooth_image(8).convert("P")
    save(palette, cat / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(smooth_image(9, 24).resize((30, 20)), cat / "rotated.jpg", "JPEG", exif=exif.tobytes())
    save(smooth_image(10).resize((8, 8)), cat / "tiny.png")
    save(smooth_image(11).resize((100, 20)), cat / "wide.png")
    # ignored entries
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (dog / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    os.symlink(cat, cat / "loop")
    # duplicates
    (dog / "s3_copy.png").write_bytes((dog / "s3.png").read_bytes())  # same split: duplicate
    (cat / "was_dog.png").write_bytes((dog / "s1.png").read_bytes())  # other class: conflict
    (root / "val" / "cat" / "leak.png").write_bytes((cat / "s0.png").read_bytes())  # leakage
    near = Image.open(dog / "s0.png").resize((40, 40), Image.Resampling.BILINEAR)
    save(near, root / "test" / "dog" / "near.jpg", "JPEG", quality=90)  # near leakage
    return root


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    return build_zoo(tmp_path / "zoo")


def rel_problems(report, kinds: tuple[str, ...] | None = None) -> dict[str, str]:
    return {
        p.relative_to(report.root).as_posix(): kind
        for p, kind, _ in report.problems
        if kinds is None or kind in kinds
    }


def test_full_check_finds_every_problem(zoo: Path) -> None:
    report = check_folder(zoo, workers=2)
    unusable = {p.path.relative_to(zoo).as_posix(): p.kind for p in report.unusable}
    assert unusable == UNUSABLE
    assert all(p.reason for p in report.unusable)
    bomb = next(p for p in report.unusable if p.kind == "over-size")
    assert "20000x20000" in bomb.reason or "decompression bomb" in bomb.reason
    # odd modes decode and count as usable: 6 plain + 8 odd files in train/cat
    assert report.counts["train"] == {"cat": 14, "dog": 7}
    assert report.counts["val"] == {"cat": 3, "dog": 2}
    assert {"RGBA", "CMYK", "I;16", "P", "RGB"} <= set(report.modes)
    ignored = {rel for rel, _ in report.ignored}
    assert {"train/cat/.DS_Store", "train/dog/Thumbs.db", "train/cat/loop"} <= ignored

    exact = {tuple(g) for g in report.exact_duplicates}
    assert ("train/dog/s3.png", "train/dog/s3_copy.png") in exact
    assert ("train/cat/s0.png", "val/cat/leak.png") in exact
    assert ("train/cat/was_dog.png", "train/dog/s1.png") in exact
    assert [tuple(g) for g in report.near_duplicates] == [("train/dog/s0.png", "test/dog/near.jpg")]
    assert {tuple(g) for g in report.leakage} == {
        ("train/cat/s0.png", "val/cat/leak.png"),
        ("train/dog/s0.png", "test/dog/near.jpg"),
    }
    assert report.label_conflicts == [["train/cat/was_dog.png", "train/dog/s1.png"]]
    findings = rel_problems(report, ("duplicate", "leakage", "label-conflict", "near-duplicate"))
    assert findings == {
        "train/dog/s3_copy.png": "duplicate",
        "val/cat/leak.png": "leakage",
        "test/dog/near.jpg": "leakage",
        "train/dog/s1.png": "label-conflict",
    }
    assert [t[0] for t in report.tiny] == ["train/cat/tiny.png"]
    assert [t[0] for t in report.extreme_aspect] == ["train/cat/wide.png"]
    assert not report.ok and report.errors == []


def test_report_text_dict_and_warnings(zoo: Path) -> None:
    report = check_folder(zoo, workers=1)
    text = report.to_text()
    for needle in (
        "Images per class",
        "imbalance ratio (max/min): 2.00 (cat 14 / dog 7)",
        "Unusable files: 5",
        "train/cat/zero.jpg: the file is empty (0 bytes)",
        "leakage across train/val/test: 2 groups",
        "Sizes, modes and formats",
        "--quarantine DIR",
    ):
        assert needle in text, needle
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["imbalance_ratio"] == 2.0
    assert {p["kind"] for p in data["problems"]} >= {"zero-byte", "leakage", "tiny"}
    warnings = "\n".join(report.warnings_summary())
    assert "5 unusable files will be skipped" in warnings
    assert "leakage" in warnings and "imbalanced 2.0:1" in warnings
    assert "--balance" in warnings


def test_fast_check_reads_headers_only(zoo: Path) -> None:
    report = check_folder(zoo, fast=True, workers=1)
    unusable = {p.path.relative_to(zoo).as_posix(): p.kind for p in report.unusable}
    expected = dict(UNUSABLE)
    del expected["train/cat/truncated.jpg"]  # its header is fine; only decoding shows the cut
    assert unusable == expected
    assert ("train/cat/s0.png", "val/cat/leak.png") in {tuple(g) for g in report.leakage}
    assert report.near_duplicates == [] and report.fast
    assert "not looked for (fast check)" in report.to_text()
    assert report.counts["train"]["cat"] == 15


def test_structural_errors_are_reported_not_raised(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(3):
        save(smooth_image(i), root / "cat" / f"{i}.png")
    (root / "dog").mkdir()
    report = check_folder(root, workers=1)
    assert any("dog is empty" in e for e in report.errors)
    assert report.warnings_summary()[0] == report.errors[0]
    single = tmp_path / "single"
    save(smooth_image(1), single / "only" / "a.png")
    assert any("needs at least 2 classes" in e for e in check_folder(single, workers=1).errors)
    with pytest.raises(DataError, match="does not exist"):
        check_folder(tmp_path / "missing")


def test_imbalance_ratio_in_class_layout(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for cls, n in (("many", 10), ("few", 2)):
        for i in range(n):
            save(smooth_image(hash((cls, i)) % 10_000), root / cls / f"{i}.png")
    report = check_folder(root, fast=True, workers=1)
    assert report.counts == {"all": {"few": 2, "many": 10}}
    assert report.imbalance == (5.0, "many", 10, "few", 2)


def test_quarantine_moves_exactly_the_bad_files(zoo: Path, tmp_path: Path) -> None:
    report = check_folder(zoo, workers=1)
    dest = tmp_path / "quarantine"
    before = {p: p.read_bytes() for p in (zoo / r for r in UNUSABLE)}
    moved = quarantine(report, dest)
    assert {src.relative_to(zoo).as_posix() for src, _ in moved} == set(UNUSABLE)
    for src, dst in moved:
        assert not os.path.lexists(src)
        assert dst == dest / src.relative_to(zoo)
        assert dst.read_bytes() == before[src]  # moved intact, never deleted
    assert (zoo / "train" / "cat" / "s0.png").exists()
    _, info = load_folder(zoo, workers=1)
    assert info.skipped == ()

    (zoo / "train" / "cat" / "zero.jpg").write_bytes(b"")  # the same bad file again
    again = check_folder(zoo, fast=True, workers=1)
    with pytest.raises(DataError, match="already exist"):
        quarantine(again, dest)
    assert (zoo / "train" / "cat" / "zero.jpg").exists()  # nothing moved on a clash

    with pytest.raises(DataError, match="contains the dataset"):
        quarantine(again, tmp_path)


def test_quarantine_inside_the_dataset_and_by_kind(zoo: Path) -> None:
    report = check_folder(zoo, workers=1)
    inside = zoo / ".quarantine"  # hidden, so later scans ignore it
    moved = quarantine(report, inside, kinds=("duplicate",))
    assert [(s.relative_to(zoo).as_posix(), d) for s, d in moved] == [
        ("train/dog/s3_copy.png", inside / "train/dog/s3_copy.png")
    ]
    (inside / "train" / "cat").mkdir(parents=True)
    (inside / "train" / "cat" / "x.jpg").write_bytes(b"")
    os.symlink(inside / "train" / "cat", zoo / "train" / "cat" / "linked")
    report = check_folder(zoo, fast=True, workers=1)
    assert "train/cat/linked/x.jpg" in rel_problems(report)
    moved = quarantine(report, inside)
    assert (inside / "train" / "cat" / "x.jpg").exists()  # not moved out of the quarantine tree
    assert "train/cat/linked/x.jpg" not in {s.relative_to(zoo).as_posix() for s, _ in moved}


def test_perceptual_hash_separates_copies_from_other_pictures() -> None:
    originals = [smooth_image(s, 48) for s in range(40)]
    hashes = [perceptual_hash(img) for img in originals]
    for img, h in zip(originals[:10], hashes[:10], strict=True):
        jpeg = io.BytesIO()
        img.save(jpeg, "JPEG", quality=75)
        for copy in (Image.open(jpeg), img.resize((30, 30)), img.point(lambda v: min(255, v + 12))):
            assert hamming(h, perceptual_hash(copy)) <= NEAR_DUPLICATE_MAX_DISTANCE
    copy = originals[3].resize((64, 64))
    all_images = [*originals, copy]
    pairs = near_duplicate_pairs(
        np.asarray([perceptual_hash(i) for i in all_images], dtype=np.uint64),
        np.stack([thumbnail(i) for i in all_images]),
    )
    assert [(i, j) for i, j, _ in pairs] == [(3, 40)]
