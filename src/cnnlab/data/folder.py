"""Folder datasets: scan a folder of class sub-folders, split it, decode it in parallel, cache the tensors.

Layouts:

- ``PATH/<class>/...``: every class folder is split into train / val / test by seeded, stratified
  fractions (see `fraction_split`); exact duplicates (same bytes) always land in the same split.
- ``PATH/train/<class>/...`` with optional ``PATH/val/<class>`` (also spelled ``valid`` or
  ``validation``) and ``PATH/test/<class>``: the folders that exist are used as given; a missing
  val/ or test/ is carved from train/ by `val_split` / `test_split` the same way (0 leaves it out).

Class names are the sub-folder names of PATH (or of train/) sorted like Keras'
image_dataset_from_directory (plain string order, so "B" sorts before "a"). Files inside a class
folder may sit in nested folders. Symbolic links are followed; a folder is never entered twice
(tracked by device and inode), so a symlink loop cannot hang the scan. Hidden names (starting
with "."), .DS_Store, Thumbs.db, desktop.ini, ehthumbs.db and __MACOSX are ignored but counted, as
are files lying outside class folders. Every other file in a class folder is a candidate image; its
content, not its extension, decides whether it can be used.

Default image size: the most common displayed (H, W) among the readable images (ties: the larger
area); if its longer side exceeds DEFAULT_MAX_SIDE (256, Keras' default size) it is scaled down
to that, keeping the aspect ratio. Default colour mode: grayscale when every image has a
single-channel mode (1, L, LA, I;16, I, F), otherwise rgb (palette images count as colour).

Decoded images are cached as one uint8 array in ``<cache_root>/folders/<key>.npz`` (cache_root:
$CNNLAB_CACHE_DIR, else $XDG_CACHE_HOME/cnnlab, else ~/.cache/cnnlab), keyed by the sorted list of
files with their sizes and modification times and by the decoding settings; any added, removed or
changed file gives a new key. Writes are atomic, loads use np.load(allow_pickle=False), and older
cache files of the same folder and settings are removed when a new one is written.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import json
import logging
import math
import os
import stat
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import PIL
import torch
from tqdm import tqdm

from cnnlab.data.download import cache_root
from cnnlab.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageHeader,
    decode_bytes,
    preload_decoders,
    probe_image,
    read_source,
    validate_settings,
)
from cnnlab.data.types import Dataset, ImageSet
from cnnlab.errors import ConfigError, DataError
from cnnlab.fileio import atomic_open

log = logging.getLogger(__name__)

LAYOUT_CLASSES = "classes"  # PATH/<class>/*
LAYOUT_SPLITS = "splits"  # PATH/train/<class>/*, PATH/val/<class>/*, PATH/test/<class>/*
SPLITS = ("train", "val", "test")
# top-level folder name (lower case) -> split; "valid" / "validation" are common exports' spelling
SPLIT_FOLDER_NAMES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
# system files ignored besides every name starting with "." (compared in lower case)
IGNORED_NAMES = frozenset(("thumbs.db", "desktop.ini", "ehthumbs.db", "__macosx"))
DEFAULT_MAX_SIDE = 256  # cap on the longer side of the default image size (Keras' default)
CACHE_VERSION = 1  # bump when the cache layout or the decoding rules change
_SPLITS_HEADER = ["path", "split", "label"]

T = TypeVar("T")
R = TypeVar("R")


class FileEntry(NamedTuple):
    """One candidate image found by the scan."""

    rel: str  # POSIX path relative to the root, through any symlinked folder
    split: str | None  # "train" / "val" / "test" in the split layout, None in the class layout
    label: int  # index into the class names
    size: int  # bytes
    mtime_ns: int


class SkippedFile(NamedTuple):
    """A file that cannot be used, with the kind of problem (images.BAD_KINDS) and the reason."""

    path: str  # relative to the root
    kind: str
    reason: str


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds, before any image is opened."""

    root: Path
    layout: str
    classes: tuple[str, ...]
    files: tuple[FileEntry, ...]  # sorted by rel
    unreadable: tuple[SkippedFile, ...]  # broken symlinks, pipes, folders that cannot be listed
    unreadable_labels: tuple[tuple[int, str | None], ...]  # (label, split) of each unreadable
    ignored: tuple[tuple[str, str], ...]  # (rel, why): hidden and system files, loose files
    split_folders: dict[str, str] = field(default_factory=dict)  # split -> folder name found
    errors: tuple[str, ...] = ()  # problems that make the folder unusable for training

    def raise_errors(self) -> None:
        """Raise one DataError listing every structural problem, if there is any."""
        if self.errors:
            raise DataError(" ".join(self.errors))


@dataclass(frozen=True)
class FolderLoadInfo:
    """Everything load_folder did, for the CLI to print and for splits.csv."""

    root: Path
    layout: str
    classes: tuple[str, ...]
    splits: dict[str, tuple[tuple[str, int], ...]]  # split -> ((rel path, label), ...), set order
    skipped: tuple[SkippedFile, ...]
    ignored: tuple[tuple[str, str], ...]  # hidden / system / loose files: (rel path, why)
    unlisted: tuple[str, ...]  # files in the folder but not in the splits file (left out)
    image_size: tuple[int, int]  # (H, W)
    color_mode: str
    resize: str
    size_rule: str  # how image_size and color_mode were chosen
    split_rule: str  # how the files were assigned to splits
    num_files: int  # candidate files, usable or not
    cache_hit: bool
    cache_path: Path | None
    decode_seconds: float  # time spent decoding (0 on a cache hit)
    load_seconds: float  # wall time of the whole load

    @property
    def bad_fraction(self) -> float:
        return len(self.skipped) / self.num_files if self.num_files else 0.0

    def summary_lines(self) -> list[str]:
        """A few human lines: what was loaded, how, and what was skipped."""
        h, w = self.image_size
        counts = ", ".join(f"{s} {len(rows)}" for s, rows in self.splits.items() if rows)
        source = "cache" if self.cache_hit else f"decoded in {self.decode_seconds:.1f} s"
        lines = [
            f"Folder {self.root} ({self.layout} layout): {len(self.classes)} classes, {counts}",
            f"Images {h}x{w} {self.color_mode} ({self.size_rule}), resize {self.resize}, "
            f"{source}, {self.load_seconds:.1f} s in all",
            f"Split: {self.split_rule}",
        ]
        if self.skipped:
            kinds = Counter(s.kind for s in self.skipped)
            top = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
            lines.append(f"Skipped {len(self.skipped)} unusable files ({top})")
        if self.unlisted:
            lines.append(f"Left out {len(self.unlisted)} files that the splits file does not list")
        if self.ignored:
            lines.append(f"Ignored {len(self.ignored)} hidden, system or loose files")
        return lines


# ----------------------------------------------------------------------------- scanning


def scan_folder(path: str | os.PathLike[str]) -> FolderScan:
    """Find the layout, the classes and the candidate files of a folder dataset (nothing decoded).

    Raises DataError when PATH is missing, not a folder, or has val/ or test/ but no train/;
    other structural problems (an empty class folder, a single class, no files, mixed layouts)
    are listed in `.errors` so that the dataset check can report them; `load_folder` raises them.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"Image folder {root} does not exist.")
    if not root.is_dir():
        raise DataError(
            f"{root} is a file, not a folder. Expected PATH/<class>/<images> "
            "or PATH/train/<class>/<images>."
        )
    walker = _Walker(root)
    top_dirs, loose = walker.list_dir(root, "")
    walker.ignore_loose(loose)
    split_dirs = {
        name: SPLIT_FOLDER_NAMES[name.lower()]
        for name in top_dirs
        if name.lower() in SPLIT_FOLDER_NAMES
    }
    if split_dirs:
        return _scan_split_layout(walker, top_dirs, split_dirs)
    classes = tuple(sorted(top_dirs))
    for label, name in enumerate(classes):
        walker.walk_class(top_dirs[name], name, label, None)
    errors = _class_errors(root, classes, walker, None)
    return walker.result(LAYOUT_CLASSES, classes, {}, errors)


def _scan_split_layout(
    walker: _Walker, top_dirs: dict[str, str], split_dirs: dict[str, str]
) -> FolderScan:
    root = walker.root
    errors: list[str] = []
    others = sorted(set(top_dirs) - set(split_dirs))
    if others:
        errors.append(
            f"{root} mixes split folders ({', '.join(sorted(split_dirs))}) with other folders "
            f"({', '.join(others)}); use either PATH/<class>/ or PATH/train/<class>/."
        )
    found: dict[str, str] = {}
    for name, split in sorted(split_dirs.items()):
        if split in found:
            errors.append(f"{root} has both {found[split]}/ and {name}/; keep one of them.")
        found.setdefault(split, name)
    if "train" not in found:
        raise DataError(
            f"{root} has {', '.join(n + '/' for n in sorted(split_dirs))} but no train/ folder; "
            "add train/<class>/ or put the class folders directly in the folder."
        )
    per_split: dict[str, dict[str, str]] = {}
    for split, name in found.items():
        sub_dirs, loose = walker.list_dir(top_dirs[name], name)
        walker.ignore_loose(loose)
        per_split[split] = sub_dirs
    classes = tuple(sorted(per_split["train"]))
    for split in SPLITS:
        if split not in per_split:
            continue
        extra = sorted(set(per_split[split]) - set(classes))
        if extra:
            errors.append(
                f"{found[split]}/ has class folders that train/ lacks: {', '.join(extra)}; "
                "every class needs training images."
            )
        for label, cls in enumerate(classes):
            if cls in per_split[split]:
                walker.walk_class(per_split[split][cls], f"{found[split]}/{cls}", label, split)
    errors += _class_errors(root, classes, walker, found)
    return walker.result(LAYOUT_SPLITS, classes, found, tuple(errors))


def _class_errors(
    root: Path, classes: tuple[str, ...], walker: _Walker, found: dict[str, str] | None
) -> tuple[str, ...]:
    where = f"{root}/train" if found else str(root)
    if not classes:
        hint = " The images must sit in one sub-folder per class." if walker.loose_files else ""
        return (
            f"No class folders in {where}. Expected {root}/<class>/<images> or "
            f"{root}/train/<class>/<images>.{hint}",
        )
    errors = [
        f"Class folder {root / rel} is empty (no image files); add images or remove it."
        for rel in walker.empty_dirs
    ]
    if len(classes) == 1:
        errors.append(
            f"Only one class folder ('{classes[0]}') in {where}; a classifier needs at least "
            "2 classes."
        )
    if not walker.files and not walker.unreadable:
        errors.append(f"No image files found under {root}.")
    return tuple(errors)


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_NAMES


class _Walker:
    """Depth-first scan that follows symlinks but enters each real folder once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: list[FileEntry] = []
        self.unreadable: list[SkippedFile] = []
        self.unreadable_labels: list[tuple[int, str | None]] = []
        self.ignored: list[tuple[str, str]] = []
        self.empty_dirs: list[str] = []
        self.loose_files: list[str] = []
        self.visited: set[tuple[int, int]] = set()
        st = os.stat(root)
        self.visited.add((st.st_dev, st.st_ino))

    def list_dir(self, folder: Path | str, rel: str) -> tuple[dict[str, str], list[str]]:
        """Sub-folders (name -> path) and loose file names of one folder, ignoring hidden names."""
        dirs: dict[str, str] = {}
        loose: list[str] = []
        for entry in self._entries(folder, rel, None, None):
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            kind = self._kind(entry, entry_rel, None, None)
            if kind == "dir":
                dirs[entry.name] = entry.path
            elif kind == "file":
                loose.append(entry_rel)
        return dirs, loose

    def ignore_loose(self, loose: list[str]) -> None:
        self.loose_files += loose
        self.ignored += [(rel, "outside class folders") for rel in loose]

    def walk_class(self, folder: str, rel: str, label: int, split: str | None) -> None:
        before = len(self.files) + len(self.unreadable)
        stack = [(folder, rel)]
        while stack:
            current, current_rel = stack.pop()
            for entry in self._entries(current, current_rel, label, split):
                entry_rel = f"{current_rel}/{entry.name}"
                if entry.is_file(follow_symlinks=False) and not _is_ignored(entry.name):
                    st = entry.stat()  # the common case: a plain file, one stat call
                    self.files.append(
                        FileEntry(entry_rel, split, label, st.st_size, st.st_mtime_ns)
                    )
                    continue
                kind = self._kind(entry, entry_rel, label, split)
                if kind == "dir":
                    stack.append((entry.path, entry_rel))
                elif kind == "file":
                    st = entry.stat()  # follows symlinks; cached by _kind
                    self.files.append(
                        FileEntry(entry_rel, split, label, st.st_size, st.st_mtime_ns)
                    )
        if len(self.files) + len(self.unreadable) == before:
            self.empty_dirs.append(rel)

    def result(
        self, layout: str, classes: tuple[str, ...], found: dict[str, str], errors: tuple[str, ...]
    ) -> FolderScan:
        return FolderScan(
            root=self.root,
            layout=layout,
            classes=classes,
            files=tuple(sorted(self.files)),
            unreadable=tuple(self.unreadable),
            unreadable_labels=tuple(self.unreadable_labels),
            ignored=tuple(sorted(self.ignored)),
            split_folders=dict(found),
            errors=errors,
        )

    def _entries(
        self, folder: Path | str, rel: str, label: int | None, split: str | None
    ) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            if label is None:
                raise DataError(f"Cannot list {folder}: {exc.strerror or exc}.") from exc
            self._unreadable(rel, f"cannot list this folder ({exc.strerror or exc})", label, split)
            return []
        return sorted(entries, key=lambda e: e.name)

    def _kind(
        self, entry: os.DirEntry[str], rel: str, label: int | None, split: str | None
    ) -> str | None:
        """'dir' (not seen before), 'file' (regular), or None after recording why it is left out."""
        if _is_ignored(entry.name):
            self.ignored.append((rel, "hidden or system file"))
            return None
        try:
            st = entry.stat()  # follows symlinks
        except OSError as exc:
            if label is not None:
                why = "a broken symbolic link" if entry.is_symlink() else "cannot be read"
                self._unreadable(rel, f"{why} ({exc.strerror or exc})", label, split)
            else:
                self.ignored.append((rel, f"cannot be read ({exc.strerror or exc})"))
            return None
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in self.visited:
                self.ignored.append((rel, "folder already scanned (a symbolic link loop?)"))
                return None
            self.visited.add(key)
            return "dir"
        if stat.S_ISREG(st.st_mode):
            return "file"
        if label is not None:
            self._unreadable(rel, "not a regular file (a pipe, socket or device)", label, split)
        else:
            self.ignored.append((rel, "not a regular file"))
        return None

    def _unreadable(self, rel: str, reason: str, label: int, split: str | None) -> None:
        self.unreadable.append(SkippedFile(rel, "unreadable", reason))
        self.unreadable_labels.append((label, split))


# ----------------------------------------------------------------------------- parallel map


def default_workers() -> int:
    """CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def chunked(items: Sequence[T], workers: int) -> list[Sequence[T]]:
    """About 8 chunks per worker for load balance, each of 16..512 items."""
    size = min(512, max(16, math.ceil(len(items) / (workers * 8))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def map_chunks(
    fn: Callable[[T], R],
    chunks: Sequence[T],
    sizes: Sequence[int],
    *,
    workers: int,
    desc: str,
    progress: bool | None = None,
) -> Iterator[R]:
    """Apply `fn` to every chunk in worker processes, yielding results as they complete.

    Runs in this process when there is one worker or one chunk. Shows a tqdm bar on stderr when
    `progress` is True (None: when stderr is a terminal), and logs progress lines otherwise.
    """
    total = sum(sizes)
    show = sys.stderr.isatty() if progress is None else progress
    bar = _Progress(total, desc, show)
    try:
        if workers <= 1 or len(chunks) <= 1:
            for chunk, n in zip(chunks, sizes, strict=True):
                result = fn(chunk)
                bar.update(n)
                yield result
            return
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            futures = {pool.submit(fn, chunk): n for chunk, n in zip(chunks, sizes, strict=True)}
            try:
                for future in cf.as_completed(futures):
                    result = future.result()
                    bar.update(futures[future])
                    yield result
            except cf.process.BrokenProcessPool as exc:
                raise DataError(
                    "An image decoder process crashed (a hostile or badly broken file?). "
                    "Run `cnnlab check PATH` to find unusable files."
                ) from exc
            finally:
                for future in futures:
                    future.cancel()
    finally:
        bar.close()


class _Progress:
    """A tqdm bar on a terminal; otherwise an INFO log line about every 10% (at most every 2 s)."""

    def __init__(self, total: int, desc: str, show: bool) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr) if show else None
        self.last_log = time.monotonic()
        self.next_step = 0.1

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        fraction = self.done / self.total if self.total else 1.0
        if fraction >= self.next_step and now - self.last_log >= 2.0 and self.done < self.total:
            log.info("%s: %d/%d images (%.0f%%)", self.desc, self.done, self.total, 100 * fraction)
            self.last_log = now
            self.next_step = fraction + 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- decoding


class _Settings(NamedTuple):
    image_size: tuple[int, int]
    color_mode: str
    resize: str
    max_pixels: int | None


def _probe_chunk(job: tuple[str, Sequence[tuple[int, str]], int | None]) -> list[Any]:
    """Worker: header of each file -> (index, header) or (index, SkippedFile)."""
    root, items, max_pixels = job
    out: list[Any] = []
    for index, rel in items:
        try:
            out.append((index, probe_image(os.path.join(root, rel), max_pixels, name=rel)))
        except ImageDecodeError as exc:
            out.append((index, SkippedFile(rel, exc.kind, exc.reason)))
    return out


def _decode_chunk(
    job: tuple[str, Sequence[tuple[int, str]], _Settings],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, SkippedFile]]]:
    """Worker: decode files -> (indices, images (k, C, H, W), sha256 (k, 32), skipped)."""
    root, items, s = job
    indices: list[int] = []
    arrays: list[np.ndarray] = []
    digests: list[bytes] = []
    skipped: list[tuple[int, SkippedFile]] = []
    for index, rel in items:
        try:
            data, _ = read_source(os.path.join(root, rel), s.max_pixels, rel)
            arrays.append(
                decode_bytes(data, rel, s.image_size, s.color_mode, s.resize, s.max_pixels)
            )
        except ImageDecodeError as exc:
            skipped.append((index, SkippedFile(rel, exc.kind, exc.reason)))
            continue
        indices.append(index)
        digests.append(hashlib.sha256(data).digest())
    channels = 1 if s.color_mode == "grayscale" else 3
    images = np.stack(arrays) if arrays else np.empty((0, channels, *s.image_size), dtype=np.uint8)
    sha = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), 32)
    return np.asarray(indices, dtype=np.int64), images, sha, skipped


@dataclass
class _Decoded:
    images: np.ndarray  # (N_ok, C, H, W) uint8, in file order
    ok_index: np.ndarray  # (N_ok,) int64 indices into scan.files
    sha: np.ndarray  # (N_ok, 32) uint8 content SHA-256
    skipped: list[tuple[int, SkippedFile]]
    image_size: tuple[int, int]
    color_mode: str
    size_rule: str
    seconds: float = 0.0
    cache_hit: bool = False


def _resolve_defaults(
    headers: dict[int, ImageHeader], image_size: tuple[int, int] | None, color_mode: str | None
) -> tuple[tuple[int, int], str, str]:
    """Fill in a missing image size / colour mode from the headers (rules in the module doc)."""
    rules = []
    if color_mode is None:
        single = all(h.single_channel for h in headers.values())
        color_mode = "grayscale" if single and headers else "rgb"
        rules.append("grayscale: every image has one channel" if single else "rgb by default")
    if image_size is None:
        sizes = Counter((h.height, h.width) for h in headers.values())
        if not sizes:
            raise DataError("No readable images to take a default image size from.")
        (h, w), count = max(sizes.items(), key=lambda kv: (kv[1], kv[0][0] * kv[0][1], kv[0]))
        rule = f"most common size {h}x{w}, {count} of {len(headers)} images"
        if max(h, w) > DEFAULT_MAX_SIDE:
            scale = DEFAULT_MAX_SIDE / max(h, w)
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
            rule += f", scaled to {h}x{w} (longer side at most {DEFAULT_MAX_SIDE})"
        image_size = (h, w)
        rules.insert(0, rule)
    else:
        rules.insert(0, "size as requested")
    return image_size, color_mode, "; ".join(rules)


def _decode_folder(
    scan: FolderScan,
    image_size: tuple[int, int] | None,
    color_mode: str | None,
    resize: str,
    max_pixels: int | None,
    workers: int,
    progress: bool | None,
) -> _Decoded:
    start = time.perf_counter()
    preload_decoders()
    root = str(scan.root)
    todo = [(i, f.rel) for i, f in enumerate(scan.files)]
    skipped: list[tuple[int, SkippedFile]] = []
    rules = "size and colour mode as requested"
    if image_size is None or color_mode is None:
        headers: dict[int, ImageHeader] = {}
        chunks = chunked(todo, workers)
        jobs = [(root, chunk, max_pixels) for chunk in chunks]
        sizes = [len(c) for c in chunks]
        for result in map_chunks(
            _probe_chunk, jobs, sizes, workers=workers, desc="Reading headers", progress=progress
        ):
            for index, value in result:
                if isinstance(value, SkippedFile):
                    skipped.append((index, value))
                else:
                    headers[index] = value
        if not headers:
            _check_bad_fraction(scan.root, [s for _, s in skipped], len(skipped), 0.0)
        image_size, color_mode, rules = _resolve_defaults(headers, image_size, color_mode)
        todo = [(i, rel) for i, rel in todo if i in headers]
    settings = _Settings(image_size, color_mode, resize, max_pixels)
    channels = 1 if color_mode == "grayscale" else 3
    images = np.empty((len(todo), channels, *image_size), dtype=np.uint8)  # (N, C, H, W)
    sha = np.empty((len(todo), 32), dtype=np.uint8)
    position = {index: pos for pos, (index, _) in enumerate(todo)}
    ok = np.zeros(len(todo), dtype=bool)
    chunks = chunked(todo, workers)
    jobs = [(root, chunk, settings) for chunk in chunks]
    for indices, arrays, digests, bad in map_chunks(
        _decode_chunk,
        jobs,
        [len(c) for c in chunks],
        workers=workers,
        desc="Decoding images",
        progress=progress,
    ):
        rows = np.asarray([position[int(i)] for i in indices], dtype=np.int64)
        images[rows], sha[rows], ok[rows] = arrays, digests, True
        skipped += bad
    keep = np.flatnonzero(ok)
    if len(keep) < len(todo):  # compact in place: every kept row moves towards the front
        for dst, src in enumerate(keep):
            if dst != src:
                images[dst] = images[src]
        images, sha = images[: len(keep)], sha[keep]
    ok_index = np.asarray([todo[p][0] for p in keep], dtype=np.int64)
    skipped.sort()
    return _Decoded(
        images,
        ok_index,
        sha,
        skipped,
        image_size,
        color_mode,
        rules,
        seconds=time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------- cache


def folder_cache_dir() -> Path:
    return cache_root() / "folders"


def _cache_path(scan: FolderScan, requested: dict[str, Any]) -> Path:
    versions = {"version": CACHE_VERSION, "pillow": PIL.__version__}  # decoders may change
    settings = json.dumps({**versions, **requested}, sort_keys=True)
    prefix = hashlib.sha256(f"{os.path.realpath(scan.root)}\n{settings}".encode()).hexdigest()
    content = hashlib.sha256(settings.encode())
    for f in scan.files:
        content.update(f"{f.rel}\t{f.size}\t{f.mtime_ns}\n".encode())
    return folder_cache_dir() / f"{prefix[:16]}-{content.hexdigest()[:32]}.npz"


def _save_cache(path: Path, decoded: _Decoded) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "version": np.asarray(CACHE_VERSION),
        "images": decoded.images,
        "ok_index": decoded.ok_index,
        "sha": decoded.sha,
        "bad_index": np.asarray([i for i, _ in decoded.skipped], dtype=np.int64),
        "bad_kind": np.asarray([s.kind for _, s in decoded.skipped], dtype=str),
        "bad_reason": np.asarray([s.reason for _, s in decoded.skipped], dtype=str),
        "image_size": np.asarray(decoded.image_size, dtype=np.int64),
        "color_mode": np.asarray(decoded.color_mode),
        "size_rule": np.asarray(decoded.size_rule),
    }
    with atomic_open(path, "wb") as handle:
        np.savez(handle, **arrays)
    for stale in path.parent.glob(f"{path.name.split('-')[0]}-*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)


def _load_cache(path: Path, scan: FolderScan) -> _Decoded | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION:
                return None
            images, ok_index, sha = z["images"], z["ok_index"], z["sha"]
            bad_index = z["bad_index"].tolist()
            kinds, reasons = z["bad_kind"].tolist(), z["bad_reason"].tolist()
            h, w = (int(v) for v in z["image_size"])
            color_mode, rule = str(z["color_mode"]), str(z["size_rule"])
        n = len(scan.files)
        valid = (
            images.dtype == np.uint8
            and images.ndim == 4
            and images.shape[0] == ok_index.shape[0] == sha.shape[0]
            and images.shape[2:] == (h, w)
            and len(ok_index) + len(bad_index) == n
            and (len(ok_index) == 0 or (ok_index.min() >= 0 and ok_index.max() < n))
        )
        if not valid:
            raise ValueError("inconsistent arrays")
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("Ignoring unreadable folder cache %s (%s); decoding again.", path, exc)
        return None
    skipped = [
        (i, SkippedFile(scan.files[i].rel, k, r))
        for i, k, r in zip(bad_index, kinds, reasons, strict=True)
    ]
    return _Decoded(images, ok_index, sha, skipped, (h, w), color_mode, rule, cache_hit=True)


# ----------------------------------------------------------------------------- splitting


def content_keys(sha: np.ndarray) -> np.ndarray:
    """(N, 32) uint8 SHA-256 digests -> (N,) uint64 keys (their first 8 bytes)."""
    return np.ascontiguousarray(sha[:, :8]).view(">u8").reshape(-1).astype(np.uint64)


def _mix(keys: np.ndarray, seed: int) -> np.ndarray:
    """A seeded bijection of uint64 keys (the splitmix64 finaliser): a fresh order per seed."""
    offset = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
    with np.errstate(over="ignore"):
        z = keys + offset
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def fraction_split(
    labels: np.ndarray,
    keys: np.ndarray,
    num_classes: int,
    val_split: float,
    test_split: float,
    seed: int,
) -> np.ndarray:
    """Assign each item to 0 (train), 1 (val) or 2 (test), stratified by label and seeded.

    Per class with n items, the targets are round(n * test_split) test and round(n * val_split)
    val items, reduced so that at least one item stays in train. `keys` (N,) uint64 are content
    keys (`content_keys`): items with the same key (identical files) stay together. Groups are
    ordered by a seeded hash of their key and filled into test, then val, then the rest train.
    The order depends only on content and seed, so adding a file moves few others.
    """
    out = np.zeros(len(labels), dtype=np.int64)
    mixed = _mix(np.asarray(keys, dtype=np.uint64), seed)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        n = len(members)
        if n == 0:
            continue
        n_test = math.floor(n * test_split + 0.5)
        n_val = math.floor(n * val_split + 0.5)
        while n_test + n_val > n - 1 and n_val > 0:
            n_val -= 1
        while n_test + n_val > n - 1 and n_test > 0:
            n_test -= 1
        # groups in seeded order, their sizes, and how many items come before each group
        _, group_of, sizes = np.unique(mixed[members], return_inverse=True, return_counts=True)
        before = np.cumsum(sizes) - sizes
        to_test = before < n_test  # a prefix of the groups
        in_test = int(sizes[to_test].sum())
        to_val = ~to_test & (before - in_test < n_val)  # the next groups
        out[members] = np.where(to_test, 2, np.where(to_val, 1, 0))[group_of]
    return out


def read_splits_csv(
    path: str | os.PathLike[str], classes: Sequence[str]
) -> dict[str, tuple[str, str]]:
    """rel path -> (split, class name) from a splits.csv; DataError for a malformed file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"Cannot read splits file {path}: {exc.strerror or exc}.") from exc
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if header != _SPLITS_HEADER:
        raise DataError(
            f"Splits file {path} must start with the header 'path,split,label', got {header!r}."
        )
    rows: dict[str, tuple[str, str]] = {}
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 3 or row[1] not in SPLITS:
            raise DataError(
                f"Splits file {path}, line {line}: expected 'path,split,label' with split one of "
                f"train, val, test; got {row!r}."
            )
        if row[0] in rows:
            raise DataError(f"Splits file {path} lists {row[0]} twice (line {line}).")
        rows[row[0]] = (row[1], row[2])
    listed = {label for _, label in rows.values()}
    if listed != set(classes):
        missing, extra = sorted(set(classes) - listed), sorted(listed - set(classes))
        raise DataError(
            f"Splits file {path} was made for other classes: the folder has "
            f"{', '.join(missing) or 'no'} classes it lacks and it lists "
            f"{', '.join(extra) or 'no'} classes the folder lacks. Drop --splits-file to split anew."
        )
    return rows


def write_splits_csv(info: FolderLoadInfo, path: str | os.PathLike[str]) -> Path:
    """Write 'path,split,label' rows (paths relative to the folder, labels as class names) atomically."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_SPLITS_HEADER)
    for split in SPLITS:
        for rel, label in info.splits.get(split, ()):
            writer.writerow([rel, split, info.classes[label]])
    with atomic_open(path, "w") as handle:
        handle.write(buffer.getvalue())
    return path


def _assign_from_file(
    scan: FolderScan, splits_file: Path, ok_files: list[FileEntry]
) -> tuple[np.ndarray, list[str]]:
    """Split codes of the usable files from a splits.csv, and the files it does not list."""
    rows = read_splits_csv(splits_file, scan.classes)
    label_of = {f.rel: f.label for f in scan.files}
    for bad, (label, _) in zip(scan.unreadable, scan.unreadable_labels, strict=True):
        label_of[bad.path] = label
    gone = [rel for rel in rows if rel not in label_of]
    if gone:
        shown = ", ".join(gone[:5]) + (", ..." if len(gone) > 5 else "")
        raise DataError(
            f"Splits file {splits_file} lists {len(gone)} files that are no longer in "
            f"{scan.root}: {shown}. Restore them, or drop --splits-file to split anew."
        )
    moved = [rel for rel, (_, cls) in rows.items() if scan.classes[label_of[rel]] != cls]
    if moved:
        raise DataError(
            f"Splits file {splits_file} gives {len(moved)} files another class than their "
            f"folder, e.g. {moved[0]}; drop --splits-file to split anew."
        )
    codes = np.full(len(ok_files), -1, dtype=np.int64)
    unlisted = []
    for k, f in enumerate(ok_files):
        if f.rel in rows:
            codes[k] = SPLITS.index(rows[f.rel][0])
        else:
            unlisted.append(f.rel)
    if unlisted:
        log.warning(
            "%d files in %s are not in the splits file %s and are left out (e.g. %s).",
            len(unlisted),
            scan.root,
            splits_file,
            unlisted[0],
        )
    return codes, unlisted


def _assign(
    scan: FolderScan,
    ok_files: list[FileEntry],
    sha: np.ndarray,
    val_split: float,
    test_split: float,
    seed: int,
) -> tuple[np.ndarray, str]:
    labels = np.asarray([f.label for f in ok_files], dtype=np.int64)
    keys = content_keys(sha)
    note = f"seed {seed}, exact duplicates kept together"
    if scan.layout == LAYOUT_CLASSES:
        codes = fraction_split(labels, keys, len(scan.classes), val_split, test_split, seed)
        rule = f"stratified fractions val {val_split:g}, test {test_split:g} ({note})"
        return codes, rule
    codes = np.asarray([SPLITS.index(f.split or "train") for f in ok_files], dtype=np.int64)
    carve_val = 0.0 if "val" in scan.split_folders else val_split
    carve_test = 0.0 if "test" in scan.split_folders else test_split
    parts = [f"{s}/ folder" for s in SPLITS if s in scan.split_folders]
    if carve_val or carve_test:
        train = np.flatnonzero(codes == 0)
        carved = fraction_split(
            labels[train],
            keys[train],
            len(scan.classes),
            carve_val,
            carve_test,
            seed,
        )
        codes[train] = carved
        parts += [
            f"{name} {frac:g} of train/"
            for name, frac in (("val", carve_val), ("test", carve_test))
            if frac
        ]
        return codes, f"{', '.join(parts)} ({note})"
    return codes, ", ".join(parts)


# ----------------------------------------------------------------------------- loading


def load_folder(
    path: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] | None = None,
    color_mode: str | None = None,
    resize: str = "stretch",
    val_split: float = 0.1,
    test_split: float = 0.1,
    seed: int = 0,
    splits_file: str | os.PathLike[str] | None = None,
    max_bad_fraction: float = 0.1,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    use_cache: bool = True,
    progress: bool | None = None,
) -> tuple[Dataset, FolderLoadInfo]:
    """Load a folder of images into uint8 tensors, split into train / val / test.

    `image_size` is (H, W); None picks the most common size (capped, see the module doc).
    `color_mode` is "grayscale" or "rgb" (None: grayscale only when every image is). `resize` is
    "stretch", "crop" or "pad" (see cnnlab.data.images). `val_split` / `test_split` are fractions
    of each class (class layout) or of train/ when val/ or test/ is missing (split layout); an
    empty split is None in the Dataset. `splits_file` reuses a splits.csv written by
    `write_splits_csv`. Unusable files are skipped and listed in the info unless they are more
    than `max_bad_fraction` of the folder (then DataError). `workers` decoder processes
    (default: the usable cores); `progress` None shows a bar only when stderr is a terminal.
    """
    started = time.perf_counter()
    _validate_load_args(image_size, color_mode, resize, val_split, test_split, max_pixels)
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConfigError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction!r}.")
    image_size = (int(image_size[0]), int(image_size[1])) if image_size is not None else None
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}.")
    scan = scan_folder(path)
    scan.raise_errors()

    requested = {
        "image_size": list(image_size) if image_size else None,
        "color_mode": color_mode,
        "resize": resize,
        "max_pixels": max_pixels,
    }
    cache_path = _cache_path(scan, requested) if use_cache else None
    decoded = _load_cache(cache_path, scan) if cache_path is not None else None
    if decoded is None:
        decoded = _decode_folder(
            scan, image_size, color_mode, resize, max_pixels, workers, progress
        )
        if cache_path is not None:
            try:
                _save_cache(cache_path, decoded)
            except (OSError, DataError) as exc:
                log.warning("Could not write the folder cache %s: %s", cache_path, exc)
                cache_path = None
    skipped = list(scan.unreadable) + [s for _, s in decoded.skipped]
    num_files = len(scan.files) + len(scan.unreadable)
    _check_bad_fraction(scan.root, skipped, num_files, max_bad_fraction)

    ok_files = [scan.files[i] for i in decoded.ok_index]
    _check_every_class_readable(scan, ok_files)
    unlisted: list[str] = []
    if splits_file is not None:
        codes, unlisted = _assign_from_file(scan, Path(splits_file), ok_files)
        split_rule = f"as listed in {splits_file}"
    else:
        codes, split_rule = _assign(scan, ok_files, decoded.sha, val_split, test_split, seed)

    labels = np.asarray([f.label for f in ok_files], dtype=np.int64)
    sets: dict[str, ImageSet | None] = {}
    rows: dict[str, tuple[tuple[str, int], ...]] = {}
    for code, split in enumerate(SPLITS):
        idx = np.flatnonzero(codes == code)
        rows[split] = tuple((ok_files[i].rel, int(labels[i])) for i in idx)
        sets[split] = (
            ImageSet(torch.from_numpy(decoded.images[idx]), torch.from_numpy(labels[idx]))
            if len(idx)
            else None
        )
    if sets["train"] is None:
        raise DataError(f"No training images in {scan.root} after the split.")
    info = FolderLoadInfo(
        root=scan.root,
        layout=scan.layout,
        classes=scan.classes,
        splits=rows,
        skipped=tuple(skipped),
        ignored=scan.ignored,
        unlisted=tuple(unlisted),
        image_size=decoded.image_size,
        color_mode=decoded.color_mode,
        resize=resize,
        size_rule=decoded.size_rule,
        split_rule=split_rule,
        num_files=num_files,
        cache_hit=decoded.cache_hit,
        cache_path=cache_path,
        decode_seconds=0.0 if decoded.cache_hit else decoded.seconds,
        load_seconds=time.perf_counter() - started,
    )
    if skipped:
        log.warning(
            "Skipped %d unusable files in %s (e.g. %s: %s).",
            len(skipped),
            scan.root,
            skipped[0].path,
            skipped[0].reason,
        )
    dataset = Dataset(
        name=scan.root.resolve().name or str(scan.root),
        classes=scan.classes,
        train=sets["train"],  # type: ignore[arg-type]
        test=sets["test"],
        val=sets["val"],
        notes={
            "source": "folder",
            "root": str(scan.root),
            "layout": scan.layout,
            "image_size": list(decoded.image_size),
            "color_mode": decoded.color_mode,
            "resize": resize,
            "skipped_files": len(skipped),
            "cache_hit": decoded.cache_hit,
        },
    )
    return dataset, info


def _validate_load_args(
    image_size: tuple[int, int] | None,
    color_mode: str | None,
    resize: str,
    val_split: float,
    test_split: float,
    max_pixels: int | None,
) -> None:
    validate_settings(image_size, color_mode or "rgb", resize, max_pixels)
    for name, value in (("val_split", val_split), ("test_split", test_split)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be a fraction in [0, 1), got {value!r}.")
    if val_split + test_split >= 1.0:
        raise ConfigError(
            f"val_split + test_split must leave images for training, got {val_split} + "
            f"{test_split}."
        )


def _check_bad_fraction(
    root: Path, skipped: list[SkippedFile], num_files: int, max_bad_fraction: float
) -> None:
    if not num_files or len(skipped) / num_files <= max_bad_fraction:
        return
    limit = f"more than max_bad_fraction {max_bad_fraction:.0%}"
    if len(skipped) == num_files:
        limit = "not a single readable image"
    kinds = Counter(s.kind for s in skipped).most_common(3)
    top = ", ".join(f"{kind} {n}" for kind, n in kinds)
    example = skipped[0]
    raise DataError(
        f"{len(skipped)} of {num_files} files in {root} ({len(skipped) / num_files:.1%}) cannot "
        f"be used, {limit}: {top} (e.g. {example.path}: {example.reason}). See them with "
        f"`cnnlab check {root}` and move them aside with `cnnlab check {root} --quarantine DIR`."
    )


def _check_every_class_readable(scan: FolderScan, ok_files: list[FileEntry]) -> None:
    present = Counter(f.label for f in ok_files if f.split in (None, "train"))
    empty = [c for i, c in enumerate(scan.classes) if present[i] == 0]
    if empty:
        raise DataError(
            f"No readable training images for class{'es' if len(empty) > 1 else ''} "
            f"{', '.join(empty)} in {scan.root}; every file there is unusable. "
            f"Run `cnnlab check {scan.root}`."
        )
