"""The dataset check of a folder of images (`cnnlab check PATH`) and the quarantine of bad files.

What it reports: images per class and the imbalance ratio (largest class / smallest); unusable
files (zero-byte, non-image, unsupported format, over-size, truncated, corrupt, unreadable), each
with its reason; exact duplicates (same SHA-256 of the bytes); near-duplicates (same picture
re-encoded, resized or slightly edited: a 64-bit perceptual hash within NEAR_DUPLICATE_MAX_DISTANCE
bits, confirmed by a 16x16 grey thumbnail correlation of at least NEAR_DUPLICATE_MIN_CORRELATION,
see `near_duplicate_pairs`); duplicates crossing train / val / test (leakage, split layout);
identical files filed under different classes; tiny images (shorter side < min_size) and extreme
aspect ratios (longer / shorter side > max_aspect); the mix of sizes, modes and formats.

`fast=True` is the part cheap enough before every training: headers only (Image.open, plus
Image.verify, which checks PNG chunk CRCs), zero-byte files, formats, counts, sizes, and exact
duplicates found by hashing only files whose byte sizes collide. It cannot see truncated JPEG
data or near-duplicates; the full check decodes every image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from cnnlab.data.folder import (
    SPLITS,
    FileEntry,
    FolderScan,
    chunked,
    default_workers,
    map_chunks,
    scan_folder,
)
from cnnlab.data.images import (
    BAD_KINDS,
    DEFAULT_MAX_PIXELS,
    UNREADABLE,
    ZERO_BYTE,
    ImageDecodeError,
    decode_failure,
    flatten_to_8bit,
    image_header,
    load_oriented,
    open_image,
    preload_decoders,
    read_source,
)
from cnnlab.data.types import Dataset
from cnnlab.errors import ConfigError, DataError

# Near-duplicates: pHash candidates, confirmed by thumbnails. Measured on Fashion-MNIST (10,000
# images) and on smooth synthetic pictures: JPEG re-encodes (quality 60-75), resizes and brightness
# changes move pHash by <= 12 bits and keep the thumbnail correlation >= 0.996, while distinct
# look-alike Fashion-MNIST items rarely pass both (about 30 pairs among 50 million).
NEAR_DUPLICATE_MAX_DISTANCE = 12  # Hamming bits of 64
NEAR_DUPLICATE_MIN_CORRELATION = 0.995  # Pearson correlation of 16x16 grey thumbnails
_THUMB_SIDE = 16
IMBALANCE_WARN_RATIO = (
    2.0  # warn before training when the largest class is this many times the smallest
)
_HASH_SIDE = 32  # the image is reduced to 32x32 grey before the DCT
_SHOWN = 10  # files listed per section in the text report

# Per-file findings besides the unusable kinds of images.BAD_KINDS.
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near-duplicate"
LEAKAGE = "leakage"
LABEL_CONFLICT = "label-conflict"
TINY = "tiny"
ASPECT = "aspect"
FINDING_KINDS = (DUPLICATE, NEAR_DUPLICATE, LEAKAGE, LABEL_CONFLICT, TINY, ASPECT)


class Problem(NamedTuple):
    """One finding about one file."""

    path: Path  # absolute (root / relative path)
    kind: str  # one of images.BAD_KINDS or FINDING_KINDS
    reason: str


class _Record(NamedTuple):
    """What a check worker learns about one file."""

    index: int
    kind: str | None  # a BAD_KINDS entry when unusable
    reason: str
    format: str
    mode: str
    width: int  # as displayed
    height: int
    sha: bytes | None  # SHA-256 of the bytes (full check, or fast check after a size collision)
    phash: int | None  # perceptual hash (full check)
    thumb: bytes | None  # 16x16 grey thumbnail (full check)


@dataclass
class CheckReport:
    """The outcome of check_folder; `to_text`, `to_dict`, `problems`, `warnings_summary`."""

    root: Path
    layout: str
    classes: tuple[str, ...]
    counts: dict[str, dict[str, int]]  # split ("all" in the class layout) -> class -> usable images
    num_files: int  # candidate image files, usable or not
    unusable: list[Problem]  # kinds from images.BAD_KINDS
    findings: list[Problem]  # duplicates, leakage, label conflicts, tiny, extreme aspect
    exact_duplicates: list[list[str]]  # groups of relative paths with identical bytes
    near_duplicates: list[list[str]]  # groups of relative paths that look alike
    leakage: list[list[str]]  # groups (exact or near) that span more than one split
    label_conflicts: list[list[str]]  # identical bytes under different classes
    tiny: list[tuple[str, int, int]]  # (rel path, width, height)
    extreme_aspect: list[tuple[str, int, int]]
    sizes: dict[str, int]  # "HxW" -> images, most common first
    modes: dict[str, int]
    formats: dict[str, int]
    ignored: list[tuple[str, str]]  # hidden / system / loose files: (rel path, why)
    errors: list[str]  # structural problems that stop training (empty class, one class, ...)
    fast: bool
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def problems(self) -> list[Problem]:
        """Every (path, kind, reason): unusable files first, then the other findings."""
        return [*self.unusable, *self.findings]

    @property
    def ok(self) -> bool:
        """True when training can use every file and nothing leaks across splits."""
        return not (self.errors or self.unusable or self.leakage or self.label_conflicts)

    @property
    def imbalance(self) -> tuple[float, str, int, str, int] | None:
        """(max/min ratio, largest class, its count, smallest class, its count) of train data."""
        counts = self.counts.get("train") or self.counts.get("all") or {}
        if len(counts) < 2:
            return None
        big = max(counts, key=lambda c: counts[c])
        small = min(reversed(counts), key=lambda c: counts[c])
        ratio = counts[big] / counts[small] if counts[small] else float("inf")
        return ratio, big, counts[big], small, counts[small]

    def warnings_summary(self) -> list[str]:
        """A short warning block for `cnnlab train` to print before training (empty when clean)."""
        lines = list(self.errors)
        if self.unusable:
            kinds = Counter(p.kind for p in self.unusable)
            top = ", ".join(f"{k} {n}" for k, n in kinds.most_common())
            lines.append(
                f"{len(self.unusable)} unusable files will be skipped ({top}); "
                f"`cnnlab check {self.root}` lists them."
            )
        if self.leakage:
            n = sum(len(g) - 1 for g in self.leakage)
            lines.append(
                f"{n} images in another split duplicate each other across train/val/test "
                "(leakage): validation and test scores will look better than they are."
            )
        if self.label_conflicts:
            lines.append(
                f"{len(self.label_conflicts)} identical files sit in more than one class folder."
            )
        extra = sum(len(g) - 1 for g in self.exact_duplicates)
        if extra:
            lines.append(f"{extra} exact duplicate copies ({len(self.exact_duplicates)} groups).")
        imbalance = self.imbalance
        if imbalance and imbalance[0] >= IMBALANCE_WARN_RATIO:
            ratio, big, n_big, small, n_small = imbalance
            lines.append(
                f"Classes are imbalanced {ratio:.1f}:1 ({big} {n_big}, {small} {n_small}); "
                "consider --balance weights or --balance sampler."
            )
        if self.tiny:
            lines.append(
                f"{len(self.tiny)} images are smaller than {self.settings.get('min_size')} px."
            )
        if self.extreme_aspect:
            lines.append(
                f"{len(self.extreme_aspect)} images have an aspect ratio beyond "
                f"{self.settings.get('max_aspect')}:1."
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole report."""
        imbalance = self.imbalance
        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": list(self.classes),
            "fast": self.fast,
            "ok": self.ok,
            "num_files": self.num_files,
            "counts": self.counts,
            "imbalance_ratio": None
            if imbalance is None or imbalance[0] == float("inf")
            else imbalance[0],
            "errors": list(self.errors),
            "problems": [{"path": str(p), "kind": k, "reason": r} for p, k, r in self.problems],
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "leakage": self.leakage,
            "label_conflicts": self.label_conflicts,
            "tiny": [list(t) for t in self.tiny],
            "extreme_aspect": [list(t) for t in self.extreme_aspect],
            "sizes": self.sizes,
            "modes": self.modes,
            "formats": self.formats,
            "ignored": [list(t) for t in self.ignored],
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
        }

    def to_text(self) -> str:
        """A readable, sectioned report."""
        kind = "fast check" if self.fast else "full check"
        out = [
            f"Dataset check of {self.root}",
            f"  {self.layout} layout, {len(self.classes)} classes, {self.num_files} image files, "
            f"{kind} in {self.seconds:.1f} s",
        ]
        if self.errors:
            out += ["", "Errors (training cannot start)"] + [f"  {e}" for e in self.errors]
        out += ["", *self._class_section()]
        out += ["", *self._unusable_section()]
        out += ["", *self._duplicate_section()]
        out += ["", *self._shape_section()]
        if self.ignored:
            names = ", ".join(rel for rel, _ in self.ignored[:5])
            more = f", ... ({len(self.ignored)} in all)" if len(self.ignored) > 5 else ""
            out += ["", f"Ignored (hidden, system or loose files): {names}{more}"]
        summary = (
            "OK: no problems found."
            if self.ok and not self.findings
            else (
                f"Summary: {len(self.unusable)} unusable files, {len(self.findings)} other findings."
            )
        )
        if self.unusable:
            summary += f" Move unusable files aside: cnnlab check {self.root} --quarantine DIR"
        out += ["", summary]
        return "\n".join(out) + "\n"

    def _class_section(self) -> list[str]:
        splits = list(self.counts)
        width = max([len(c) for c in self.classes] + [5])
        lines = ["Images per class"]
        lines.append("  " + "class".ljust(width) + "".join(f"{s:>9}" for s in splits))
        for cls in self.classes:
            row = "".join(f"{self.counts[s].get(cls, 0):>9}" for s in splits)
            lines.append(f"  {cls.ljust(width)}{row}")
        imbalance = self.imbalance
        if imbalance:
            ratio, big, n_big, small, n_small = imbalance
            shown = "infinite" if ratio == float("inf") else f"{ratio:.2f}"
            lines.append(
                f"  imbalance ratio (max/min): {shown} ({big} {n_big} / {small} {n_small})"
            )
        return lines

    def _unusable_section(self) -> list[str]:
        if not self.unusable:
            return ["Unusable files: none"]
        lines = [f"Unusable files: {len(self.unusable)} (training skips them)"]
        by_kind: dict[str, list[Problem]] = defaultdict(list)
        for p in self.unusable:
            by_kind[p.kind].append(p)
        for kind in sorted(by_kind, key=lambda k: -len(by_kind[k])):
            lines.append(f"  {kind} ({len(by_kind[kind])})")
            lines += [f"    {self._rel(p.path)}: {p.reason}" for p in by_kind[kind][:_SHOWN]]
            if len(by_kind[kind]) > _SHOWN:
                lines.append(f"    ... and {len(by_kind[kind]) - _SHOWN} more")
        return lines

    def _duplicate_section(self) -> list[str]:
        lines = ["Duplicates"]
        groups = (
            ("exact duplicates (same bytes)", self.exact_duplicates),
            (
                "near-duplicates (pHash within "
                f"{self.settings.get('near_distance')} bits, thumbnail correlation >= "
                f"{self.settings.get('near_correlation')})",
                self.near_duplicates,
            ),
            ("leakage across train/val/test", self.leakage),
            ("same file in different classes", self.label_conflicts),
        )
        for title, found in groups:
            if self.fast and title.startswith("near"):
                lines.append(f"  {title}: not looked for (fast check)")
                continue
            extra = sum(len(g) - 1 for g in found)
            lines.append(f"  {title}: {len(found)} groups, {extra} extra copies")
            lines += [f"    {' = '.join(g)}" for g in found[:_SHOWN]]
            if len(found) > _SHOWN:
                lines.append(f"    ... and {len(found) - _SHOWN} more groups")
        return lines

    def _shape_section(self) -> list[str]:
        def top(counter: dict[str, int]) -> str:
            items = list(counter.items())
            text = ", ".join(f"{k} ({n})" for k, n in items[:5])
            return text + (f", ... {len(items)} in all" if len(items) > 5 else "")

        lines = ["Sizes, modes and formats (H x W as displayed)"]
        lines.append(
            f"  sizes: {top(self.sizes) or '-'}" + (" (mixed)" if len(self.sizes) > 1 else "")
        )
        lines.append(
            f"  modes: {top(self.modes) or '-'}" + (" (mixed)" if len(self.modes) > 1 else "")
        )
        lines.append(f"  formats: {top(self.formats) or '-'}")
        for title, items in (
            (f"tiny images (shorter side < {self.settings.get('min_size')} px)", self.tiny),
            (f"extreme aspect ratios (> {self.settings.get('max_aspect')}:1)", self.extreme_aspect),
        ):
            lines.append(f"  {title}: {len(items)}")
            lines += [f"    {rel}: {w}x{h} (W x H)" for rel, w, h in items[:_SHOWN]]
        return lines

    def _rel(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return path.relative_to(self.root).as_posix()
        return str(path)


# ----------------------------------------------------------------------------- hashing


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m  # orthonormal DCT-II, (n, n)


_DCT8 = _dct_matrix(_HASH_SIDE)[:8]  # (8, 32): only the lowest 8 frequencies are needed


def perceptual_hash(image: Image.Image) -> int:
    """64-bit pHash: grey 32x32, 2-D DCT, the 8x8 lowest frequencies compared with their median.

    JPEG re-encoding, resizing and brightness changes move a few bits; an unrelated picture
    about half of them.
    """
    return _phash32(_grey32(image))


def _grey32(image: Image.Image) -> Image.Image:
    return image.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BILINEAR)


def _phash32(grey: Image.Image) -> int:
    pixels = np.asarray(grey, dtype=np.float64)  # (32, 32)
    low = (_DCT8 @ pixels @ _DCT8.T).ravel()  # the 8x8 lowest frequencies, (64,)
    rest = np.sort(low[1:])  # 63 values without the DC term
    bits = low > rest[31]  # above the median
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def thumbnail(image: Image.Image) -> np.ndarray:
    """16x16 grey thumbnail, uint8 (16, 16), the confirmation step of near-duplicate detection."""
    return _thumb32(_grey32(image))


def _thumb32(grey: Image.Image) -> np.ndarray:
    small = grey.resize((_THUMB_SIDE, _THUMB_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _normalised(thumbs: np.ndarray) -> np.ndarray:
    """(N, 256) zero-mean, unit-norm rows, so that a dot product is a Pearson correlation."""
    t = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    t -= t.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(t, axis=1, keepdims=True)
    return np.divide(t, norms, out=np.zeros_like(t), where=norms > 0)


def near_duplicate_pairs(
    hashes: np.ndarray,
    thumbs: np.ndarray,
    max_distance: int = NEAR_DUPLICATE_MAX_DISTANCE,
    min_correlation: float = NEAR_DUPLICATE_MIN_CORRELATION,
) -> list[tuple[int, int, int]]:
    """All (i, j, pHash distance), i < j, of near-duplicate pictures.

    `hashes` (N,) uint64 from `perceptual_hash`, `thumbs` (N, 16, 16) uint8 from `thumbnail`.
    Every pair within `max_distance` bits (exact search in blocks, popcount of XOR) is confirmed
    by a thumbnail correlation >= `min_correlation`.
    """
    unit = _normalised(thumbs)  # (N, 256)
    pairs: list[tuple[int, int, int]] = []
    block = 128  # rows compared at once: 128 x N uint64 stays small
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block]
        dist = np.bitwise_count(rows[:, None] ^ hashes[None, start:])  # (b, N - start)
        ii, jj = np.nonzero(dist <= max_distance)
        keep = jj > ii  # column 0 is row `start`: the upper triangle only
        ii, jj = ii[keep], jj[keep]
        corr = np.einsum("ij,ij->i", unit[start + ii], unit[start + jj])
        for i, j in zip(ii[corr >= min_correlation], jj[corr >= min_correlation], strict=True):
            pairs.append((start + int(i), start + int(j), int(dist[i, j])))
    return pairs


def _groups(n: int, pairs: Iterable[tuple[int, int, int]]) -> list[list[int]]:
    """Connected components (size >= 2) of a pair list, by union-find."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[find(i)].append(i)
    return [m for m in members.values() if len(m) > 1]


# ----------------------------------------------------------------------------- workers


def _inspect_chunk(job: tuple[str, Sequence[tuple[int, str]], bool, int | None]) -> list[_Record]:
    """Worker: one _Record per file (header only when fast, a full decode otherwise)."""
    root, items, fast, max_pixels = job
    out = []
    for index, rel in items:
        path = os.path.join(root, rel)
        try:
            out.append(
                _inspect_fast(index, path, rel, max_pixels)
                if fast
                else _inspect_full(index, path, rel, max_pixels)
            )
        except ImageDecodeError as exc:
            out.append(_Record(index, exc.kind, exc.reason, "", "", 0, 0, None, None, None))
    return out


def _inspect_fast(index: int, path: str, rel: str, max_pixels: int | None) -> _Record:
    try:
        if os.stat(path).st_size == 0:
            raise ImageDecodeError(rel, ZERO_BYTE, "the file is empty (0 bytes)")
        with open(path, "rb") as handle:
            img = open_image(handle, rel, max_pixels)
            try:
                img.verify()  # PNG: chunk CRCs; other formats: nothing costly
            except Exception as exc:  # Pillow raises many types for damaged data
                raise decode_failure(rel, exc) from exc
            handle.seek(0)  # verify() leaves the image unusable: read the header again
            header = image_header(open_image(handle, rel, max_pixels))
    except OSError as exc:
        reason = f"cannot read the file ({exc.strerror or exc})"
        raise ImageDecodeError(rel, UNREADABLE, reason) from exc
    return _Record(
        index, None, "", header.format, header.mode, header.width, header.height, None, None, None
    )


def _inspect_full(index: int, path: str, rel: str, max_pixels: int | None) -> _Record:
    data, _ = read_source(path, max_pixels, rel)
    img = open_image(io.BytesIO(data), rel, max_pixels)
    header = image_header(img)
    if header.format in ("JPEG", "MPO"):  # decode at a reduced DCT scale, still every byte
        img.draft(None, (2 * _HASH_SIDE, 2 * _HASH_SIDE))
    grey = _grey32(flatten_to_8bit(load_oriented(img, rel), rel))
    return _Record(
        index,
        None,
        "",
        header.format,
        header.mode,
        header.width,
        header.height,
        hashlib.sha256(data).digest(),
        _phash32(grey),
        _thumb32(grey).tobytes(),
    )


def _hash_chunk(job: tuple[str, Sequence[tuple[int, str]]]) -> list[tuple[int, bytes | None]]:
    """Worker: SHA-256 of each file's bytes (None when it cannot be read any more)."""
    root, items = job
    out: list[tuple[int, bytes | None]] = []
    for index, rel in items:
        try:
            out.append((index, hashlib.sha256(Path(root, rel).read_bytes()).digest()))
        except OSError:
            out.append((index, None))
    return out


# ----------------------------------------------------------------------------- the check


def check_folder(
    path: str | os.PathLike[str],
    *,
    near_duplicates: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_size: int = 16,
    max_aspect: float = 4.0,
    fast: bool = False,
    workers: int | None = None,
    progress: bool | None = None,
) -> CheckReport:
    """Check a folder dataset (either layout of cnnlab.data.folder) and return the findings.

    Never raises for problems inside the folder; they are in the report. Raises DataError only
    when PATH is missing or not a folder, ConfigError for invalid settings.
    """
    started = time.perf_counter()
    if min_size < 1 or max_aspect < 1.0:
        raise ConfigError(
            f"min_size must be >= 1 and max_aspect >= 1, got {min_size}, {max_aspect}."
        )
    workers = default_workers() if workers is None else max(1, workers)
    scan = scan_folder(path)
    records = _inspect_all(scan, fast, max_pixels, workers, progress)
    if fast:
        _hash_size_collisions(scan, records, workers, progress)
    report = _assemble(scan, records, fast)
    report.settings = {
        "max_pixels": max_pixels,
        "min_size": min_size,
        "max_aspect": max_aspect,
        "near_distance": NEAR_DUPLICATE_MAX_DISTANCE,
        "near_correlation": NEAR_DUPLICATE_MIN_CORRELATION,
        "near_duplicates": near_duplicates and not fast,
    }
    _find_duplicates(report, scan, records, near_duplicates and not fast)
    _find_shapes(report, scan, records, min_size, max_aspect)
    report.seconds = time.perf_counter() - started
    return report


def _inspect_all(
    scan: FolderScan, fast: bool, max_pixels: int | None, workers: int, progress: bool | None
) -> list[_Record]:
    preload_decoders()
    items = [(i, f.rel) for i, f in enumerate(scan.files)]
    chunks = chunked(items, workers)
    jobs = [(str(scan.root), c, fast, max_pixels) for c in chunks]
    records: list[_Record] = []
    desc = "Checking headers" if fast else "Checking images"
    for result in map_chunks(
        _inspect_chunk,
        jobs,
        [len(c) for c in chunks],
        workers=workers,
        desc=desc,
        progress=progress,
    ):
        records += result
    records.sort()
    return records


def _hash_size_collisions(
    scan: FolderScan, records: list[_Record], workers: int, progress: bool | None
) -> None:
    """Fast check: hash only the usable files that share their byte size with another."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for r in records:
        if r.kind is None:
            by_size[scan.files[r.index].size].append(r.index)
    todo = [(i, scan.files[i].rel) for group in by_size.values() if len(group) > 1 for i in group]
    if not todo:
        return
    chunks = chunked(todo, workers)
    jobs = [(str(scan.root), c) for c in chunks]
    for result in map_chunks(
        _hash_chunk,
        jobs,
        [len(c) for c in chunks],
        workers=workers,
        desc="Hashing",
        progress=progress,
    ):
        for index, digest in result:
            records[index] = records[index]._replace(sha=digest)


def _assemble(scan: FolderScan, records: list[_Record], fast: bool) -> CheckReport:
    root = scan.root
    unusable = [Problem(root / u.path, u.kind, u.reason) for u in scan.unreadable]
    unusable += [
        Problem(root / scan.files[r.index].rel, r.kind, r.reason) for r in records if r.kind
    ]
    unusable.sort()
    split_keys = [s for s in SPLITS if s in scan.split_folders] or ["all"]
    counts = {s: {c: 0 for c in scan.classes} for s in split_keys}
    for r in records:
        if r.kind is None:
            f = scan.files[r.index]
            counts[f.split or "all"][scan.classes[f.label]] += 1
    good = [r for r in records if r.kind is None]
    return CheckReport(
        root=root,
        layout=scan.layout,
        classes=scan.classes,
        counts=counts,
        num_files=len(scan.files) + len(scan.unreadable),
        unusable=unusable,
        findings=[],
        exact_duplicates=[],
        near_duplicates=[],
        leakage=[],
        label_conflicts=[],
        tiny=[],
        extreme_aspect=[],
        sizes=dict(Counter(f"{r.height}x{r.width}" for r in good).most_common()),
        modes=dict(Counter(r.mode for r in good).most_common()),
        formats=dict(Counter(r.format for r in good).most_common()),
        ignored=list(scan.ignored),
        errors=list(scan.errors),
        fast=fast,
    )


def _order_key(f: FileEntry) -> tuple[int, str]:
    """Originals first: train before val before test, then by path."""
    return (SPLITS.index(f.split) if f.split else 0, f.rel)


def _find_duplicates(
    report: CheckReport, scan: FolderScan, records: list[_Record], near: bool
) -> None:
    good = [r for r in records if r.kind is None]
    by_sha: dict[bytes, list[FileEntry]] = defaultdict(list)
    for r in good:
        if r.sha is not None:
            by_sha[r.sha].append(scan.files[r.index])
    representatives: list[_Record] = []
    seen: set[bytes] = set()
    for r in good:
        if r.sha is None or r.sha not in seen:
            representatives.append(r)
            if r.sha is not None:
                seen.add(r.sha)
    for group in by_sha.values():
        if len(group) > 1:
            _classify_group(report, scan, sorted(group, key=_order_key), exact=True, distance=0)
    if not near:
        return
    hashes = np.asarray([r.phash for r in representatives], dtype=np.uint64)
    thumbs = np.frombuffer(b"".join(r.thumb or b"" for r in representatives), dtype=np.uint8)
    pairs = near_duplicate_pairs(hashes, thumbs.reshape(len(representatives), -1))
    groups = _groups(len(representatives), pairs)
    group_of = {m: g for g, members in enumerate(groups) for m in members}
    worst = [0] * len(groups)
    for i, _, d in pairs:
        worst[group_of[i]] = max(worst[group_of[i]], d)
    for g, members in enumerate(groups):
        files = sorted((scan.files[representatives[m].index] for m in members), key=_order_key)
        _classify_group(report, scan, files, exact=False, distance=worst[g])


def _classify_group(
    report: CheckReport, scan: FolderScan, files: list[FileEntry], *, exact: bool, distance: int
) -> None:
    paths = [f.rel for f in files]
    first = files[0]
    if exact:
        how = f"same bytes as {files[0].rel}"
    else:
        how = f"looks like {files[0].rel} (pHash distance <= {distance})"
    if exact:
        report.exact_duplicates.append(paths)
    else:
        report.near_duplicates.append(paths)
    if len({f.split for f in files}) > 1:
        report.leakage.append(paths)
    if exact and len({f.label for f in files}) > 1:
        report.label_conflicts.append(paths)
    for f in files[1:]:
        if f.split != first.split:
            kind, extra = (
                LEAKAGE,
                f" in {first.split}/: the model would be scored on a training image",
            )
        elif f.label != first.label:
            kind, extra = LABEL_CONFLICT, f" filed under class '{scan.classes[first.label]}'"
        else:
            kind, extra = (DUPLICATE if exact else NEAR_DUPLICATE), ""
        report.findings.append(Problem(scan.root / f.rel, kind, how + extra))


def _find_shapes(
    report: CheckReport,
    scan: FolderScan,
    records: list[_Record],
    min_size: int,
    max_aspect: float,
) -> None:
    for r in records:
        if r.kind is not None:
            continue
        rel, w, h = scan.files[r.index].rel, r.width, r.height
        if min(w, h) < min_size:
            report.tiny.append((rel, w, h))
            report.findings.append(
                Problem(scan.root / rel, TINY, f"only {w}x{h} px (W x H), under {min_size} px")
            )
        if max(w, h) / min(w, h) > max_aspect:
            report.extreme_aspect.append((rel, w, h))
            report.findings.append(
                Problem(
                    scan.root / rel, ASPECT, f"{w}x{h} px (W x H), aspect beyond {max_aspect}:1"
                )
            )


# ----------------------------------------------------------------------------- quarantine


def quarantine(
    report: CheckReport,
    dest_dir: str | os.PathLike[str],
    *,
    kinds: Sequence[str] = BAD_KINDS,
) -> list[tuple[Path, Path]]:
    """Move the files the report found (of `kinds`, by default the unusable ones) into dest_dir.

    Files keep their path relative to the dataset root under dest_dir. Nothing is deleted or
    overwritten: when any destination exists, DataError lists the clashes and nothing moves.
    Files already inside dest_dir's own tree stay where they are, and a dest_dir that contains
    the dataset is refused. Returns the (source, destination) pairs moved.
    """
    unknown = sorted(set(kinds) - set(BAD_KINDS) - set(FINDING_KINDS))
    if unknown:
        raise ConfigError(
            f"Unknown problem kinds {', '.join(unknown)}; allowed: "
            f"{', '.join((*BAD_KINDS, *FINDING_KINDS))}."
        )
    dest = Path(dest_dir).expanduser().absolute()
    dest_real = Path(os.path.realpath(dest))
    root_real = Path(os.path.realpath(report.root))
    if root_real == dest_real or root_real.is_relative_to(dest_real):
        raise DataError(
            f"The quarantine folder {dest} contains the dataset {report.root}; "
            "choose a folder outside it."
        )
    wanted = sorted({p.path for p in report.problems if p.kind in kinds})
    plan: list[tuple[Path, Path]] = []
    for src in wanted:
        if not os.path.lexists(src):
            continue  # already moved or deleted since the check
        entry_real = Path(os.path.realpath(src.parent)) / src.name
        if entry_real.is_relative_to(dest_real):
            continue  # never move anything out of the quarantine's own tree
        rel = src.relative_to(report.root)
        plan.append((src, dest / rel))
    clashes = [dst for _, dst in plan if os.path.lexists(dst)]
    if clashes:
        shown = ", ".join(str(c) for c in clashes[:5])
        raise DataError(
            f"{len(clashes)} files already exist in {dest} (e.g. {shown}); nothing was moved. "
            "Choose an empty quarantine folder."
        )
    moved = []
    for src, dst in plan:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _move_no_overwrite(src, dst)
        moved.append((src, dst))
    return moved


def _move_no_overwrite(src: Path, dst: Path) -> None:
    """Move one file (or symlink) to a path that must not exist; atomic where one filesystem."""
    try:
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            try:
                os.link(src, dst)  # fails if dst exists
            except FileExistsError:
                raise
            except OSError:  # another filesystem, or no hard links: copy into a new file
                with open(src, "rb") as fin, open(dst, "xb") as fout:
                    shutil.copyfileobj(fin, fout)
                    fout.flush()
                    os.fsync(fout.fileno())
                shutil.copystat(src, dst)
    except FileExistsError as exc:
        raise DataError(f"{dst} already exists; not overwriting it ({src} stays).") from exc
    os.unlink(src)


def load_warnings(dataset: Dataset) -> list[str]:
    """The fast check `cnnlab train` prints, built from what loading produced: no second pass.

    Reports class imbalance and images whose decoded pixels repeat within or across splits
    (leakage); `load_folder` itself warns about skipped files. Near-duplicates and size oddities
    need the full `cnnlab check`.
    """
    lines: list[str] = []
    parts = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    counts = Counter()
    seen: dict[bytes, set[str]] = defaultdict(set)
    copies = 0
    for split, images in parts.items():
        if images is None:
            continue
        counts.update(images.labels.tolist())
        pixels = images.images.reshape(len(images), -1).numpy()
        for row in pixels:
            digest = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            copies += bool(seen[digest])
            seen[digest].add(split)
    leaked = sum(1 for splits in seen.values() if len(splits) > 1)
    if leaked:
        lines.append(
            f"{leaked} images appear in more than one of train/val/test (leakage): validation "
            "and test scores will look better than they are."
        )
    if copies:
        lines.append(f"{copies} images are pixel-identical copies of another image.")
    if counts:
        (big, n_big), (small, n_small) = counts.most_common()[0], counts.most_common()[-1]
        if n_big / max(n_small, 1) >= IMBALANCE_WARN_RATIO:
            lines.append(
                f"Classes are imbalanced {n_big / n_small:.1f}:1 ({dataset.classes[big]} {n_big}, "
                f"{dataset.classes[small]} {n_small}); consider --balance weights or "
                "--balance sampler."
            )
    return lines
