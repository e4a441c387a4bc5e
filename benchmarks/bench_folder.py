"""Folder dataset speed: Fashion-MNIST written as PNG class folders, decoded cold, then from the cache.

    python benchmarks/bench_folder.py --out /tmp/fm_folder --limit 20000

Writes `--limit` training images of Fashion-MNIST (from /usr/share/datasets/fashion-mnist) as
PNG files in one folder per class, plants a few broken files (and prints which), then times a
cold load with the default settings (header pass + decode), cold loads with an explicit size on
1 and on all workers, the cached reload, and the fast and full dataset checks. The cache goes to
a temporary folder, never to the user's cache.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from PIL import Image

from cnnlab.data.check import check_folder
from cnnlab.data.folder import default_workers, load_folder
from cnnlab.data.idx import read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
)  # fmt: skip
MARKER = ".cnnlab-bench"  # hidden, so the loader ignores it
T = TypeVar("T")


def write_folder(out: Path, limit: int) -> int:
    """Write the first `limit` training images as PNG; returns the number written."""
    if out.exists():
        if not (out / MARKER).exists():
            sys.exit(f"{out} exists and was not made by this benchmark; choose another --out.")
        shutil.rmtree(out)
    images = read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz")[:limit]  # (N, 28, 28) uint8
    labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")[:limit]
    for name in CLASSES:
        (out / name).mkdir(parents=True)
    (out / MARKER).write_text("written by benchmarks/bench_folder.py\n")
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(pixels, "L").save(out / CLASSES[label] / f"{i:05d}.png", compress_level=1)
    return len(images)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny grey PNG whose header declares width x height (a decompression bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)  # the first rows only
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def plant_broken(out: Path) -> dict[str, str]:
    """A few broken files of different kinds; returns relative path -> what it is."""
    good = next((out / CLASSES[0]).glob("*.png")).read_bytes()
    planted = {
        f"{CLASSES[1]}/empty.png": (b"", "zero-byte file"),
        f"{CLASSES[2]}/notes.png": (b"just some text, named .png\n", "text file named .png"),
        f"{CLASSES[3]}/cut.png": (good[: len(good) // 2], "truncated PNG"),
        f"{CLASSES[4]}/bomb.png": (bomb_png(20000, 20000), "PNG declaring 20000x20000"),
    }
    for rel, (data, _) in planted.items():
        (out / rel).write_bytes(data)
    return {rel: what for rel, (_, what) in planted.items()}


def timed(label: str, rows: list[tuple[str, float, int]], n: int, fn: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = fn()
    rows.append((label, time.perf_counter() - start, n))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the PNGs into")
    parser.add_argument("--limit", type=int, default=20000, help="number of images (max 60000)")
    parser.add_argument("--workers", type=int, default=None, help="decoder processes")
    args = parser.parse_args()
    workers = args.workers or default_workers()
    logging.getLogger("cnnlab").setLevel(logging.ERROR)  # the skipped files are printed below

    start = time.perf_counter()
    n = write_folder(args.out, args.limit)
    print(f"Wrote {n} PNG files to {args.out} in {time.perf_counter() - start:.1f} s")
    for rel, what in plant_broken(args.out).items():
        print(f"  planted {rel}: {what}")
    total = n + 4

    cache = Path(tempfile.mkdtemp(prefix="cnnlab-bench-cache-"))
    os.environ["CNNLAB_CACHE_DIR"] = str(cache)
    rows: list[tuple[str, float, int]] = []
    try:
        common = {"progress": False}
        _, info = timed(
            f"cold load, default size/colour, {workers} workers", rows, total,
            lambda: load_folder(args.out, workers=workers, use_cache=False, **common),
        )  # fmt: skip
        explicit = {"image_size": (28, 28), "color_mode": "grayscale", **common}
        timed(
            "cold load, explicit 28x28 grayscale, 1 worker", rows, total,
            lambda: load_folder(args.out, workers=1, use_cache=False, **explicit),
        )  # fmt: skip
        timed(
            f"cold load + cache write, explicit, {workers} workers", rows, total,
            lambda: load_folder(args.out, workers=workers, **explicit),
        )  # fmt: skip
        dataset, cached = timed(
            "cached reload", rows, total, lambda: load_folder(args.out, workers=workers, **explicit)
        )
        report_fast = timed(
            f"check, fast, {workers} workers", rows, total,
            lambda: check_folder(args.out, fast=True, workers=workers, progress=False),
        )  # fmt: skip
        report = timed(
            f"check, full, {workers} workers", rows, total,
            lambda: check_folder(args.out, workers=workers, progress=False),
        )  # fmt: skip
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    print()
    print("\n".join(info.summary_lines()))
    print(f"cache hit on reload: {cached.cache_hit}; train {tuple(dataset.train.images.shape)}")
    print("skipped:", ", ".join(f"{s.path} ({s.kind})" for s in info.skipped))
    print(f"fast check found {len(report_fast.unusable)} unusable files, full check "
          f"{len(report.unusable)}; exact duplicate groups {len(report.exact_duplicates)}, "
          f"near-duplicate groups {len(report.near_duplicates)}")  # fmt: skip
    print()
    print(f"{'phase':<48}{'seconds':>9}{'images/s':>11}")
    for label, seconds, count in rows:
        print(f"{label:<48}{seconds:>9.2f}{count / seconds:>11,.0f}")
    print(f"\n{n} images of 28x28, {os.cpu_count()} CPUs, workers={workers}")


if __name__ == "__main__":
    main()
