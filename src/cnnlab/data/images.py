"""Safe decoding of one image file into uint8 (C, H, W): allowed formats, a pixel cap, all modes.

Rules (the same for folder datasets and for `cnnlab predict`):

- Formats: JPEG (and MPO, the multi-picture JPEG phones write), PNG, WEBP, BMP and GIF, decided by
  the content (`img.format` after opening with only those plugins), never by the extension. Only
  the first frame of an animated GIF / PNG / WEBP is used.
- Pixel cap: the width and height in the header are checked against `max_pixels` before any pixel
  is decoded, so a small file declaring 20000x20000 is rejected without allocating. Pillow's own
  decompression-bomb refusal is reported the same way ("over-size").
- EXIF orientation is applied (a photo taken sideways comes out upright).
- Modes: transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited on
  white; CMYK, YCbCr, LAB and HSV are converted to RGB; 16-bit (I;16*) and 32-bit integer (I)
  images are scaled from 0..65535 to 0..255 with rounding (65535 -> 255, 32768 -> 128), an
  integer image outside 0..65535 is min-max scaled; float (F) images in [0, 1] are multiplied by
  255, in [0, 255] rounded, otherwise min-max scaled; 1-bit becomes 0/255.
- Colour: "rgb" gives 3 channels (grey images are replicated), "grayscale" gives 1 channel
  (ITU-R 601-2 luma, Pillow's "L" conversion).
- Resize to (H, W) with antialiased bilinear resampling:
  "stretch" ignores the aspect ratio; "crop" cuts the largest centred region with the target's
  aspect ratio, then resizes (nothing is distorted, the borders are lost); "pad" fits the whole
  image inside (H, W) keeping its aspect ratio and fills the rest with black, i.e. zeros (a
  letterbox, like Keras' pad_to_aspect_ratio). `image_size=None` keeps the image's own size.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnlab.errors import ConfigError, DataError, unknown_name

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # Pillow plugin ids tried when opening
_ACCEPTED_FORMATS = frozenset((*ALLOWED_FORMATS, "MPO"))  # MPO: a JPEG with extra pictures
DEFAULT_MAX_PIXELS = 50_000_000  # 50 megapixels: above any phone photo, far below a bomb
COLOR_MODES = ("grayscale", "rgb")
RESIZE_MODES = ("stretch", "crop", "pad")
# Modes whose pixels carry one grey value (plus maybe alpha); used to pick a default colour mode.
SINGLE_CHANNEL_MODES = frozenset(
    ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
)

# Kinds of unusable file, shared by the folder loader and the dataset check.
ZERO_BYTE = "zero-byte"
NOT_IMAGE = "non-image"
UNSUPPORTED = "unsupported-format"
OVER_SIZE = "over-size"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
UNREADABLE = "unreadable"
BAD_KINDS = (ZERO_BYTE, NOT_IMAGE, UNSUPPORTED, OVER_SIZE, TRUNCATED, CORRUPT, UNREADABLE)

_EXIF_ORIENTATION = 0x0112
_BYTES_PER_PIXEL_LIMIT = 8  # 16-bit RGBA is the widest allowed pixel: a bigger file cannot fit
_ALLOWED_TEXT = "JPEG, PNG, WEBP, BMP or GIF"

# Signatures of common image formats that are deliberately not decoded, for a precise message.
_KNOWN_UNSUPPORTED: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD (Photoshop)"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
)
# Signatures of the allowed formats: a file that starts like one but does not open is corrupt.
_ALLOWED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"RIFF", "WEBP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


class ImageDecodeError(DataError):
    """An image file that cannot be used: `kind` is one of BAD_KINDS, `reason` says why in words."""

    def __init__(self, name: str, kind: str, reason: str) -> None:
        super().__init__(f"Cannot use image {name}: {reason}")
        self.name = name
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image says, read without decoding its pixels."""

    format: str  # Pillow's format id, e.g. "PNG"
    mode: str  # Pillow mode, e.g. "RGB", "I;16", "P"
    width: int  # as displayed, i.e. after the EXIF orientation
    height: int
    orientation: int  # EXIF orientation tag, 1 when absent

    @property
    def single_channel(self) -> bool:
        return self.mode in SINGLE_CHANNEL_MODES


Source = str | os.PathLike[str] | bytes


def decode_image(
    source: Source,
    image_size: tuple[int, int] | None = None,
    color_mode: str = "rgb",
    resize: str = "stretch",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    *,
    name: str | None = None,
) -> np.ndarray:
    """Decode one image file (a path or its bytes) into a uint8 array of shape (C, H, W).

    `image_size` is (H, W) or None for the image's own size. `name` labels bytes in messages
    (e.g. an uploaded file's name). Raises ImageDecodeError (a DataError) naming the file, with
    `.kind` in BAD_KINDS and `.reason` in words; ConfigError for invalid settings.
    """
    validate_settings(image_size, color_mode, resize, max_pixels)
    data, label = read_source(source, max_pixels, name)
    return decode_bytes(data, label, image_size, color_mode, resize, max_pixels)


def probe_image(
    source: Source, max_pixels: int | None = DEFAULT_MAX_PIXELS, *, name: str | None = None
) -> ImageHeader:
    """Read only the header of one image: format, mode and displayed size, with the same checks.

    Raises ImageDecodeError for an empty, unsupported, non-image or over-size file.
    """
    if isinstance(source, bytes):
        label = name or "<bytes>"
        _check_nonempty(len(source), label)
        return image_header(open_image(io.BytesIO(source), label, max_pixels))
    path = Path(source)
    label = name or str(path)
    _check_nonempty(_regular_file_size(path, label), label)
    try:
        with path.open("rb") as handle:
            return image_header(open_image(handle, label, max_pixels))
    except OSError as exc:
        raise ImageDecodeError(
            label, UNREADABLE, f"cannot read the file ({exc.strerror or exc})"
        ) from exc


def validate_settings(
    image_size: tuple[int, int] | None, color_mode: str, resize: str, max_pixels: int | None
) -> None:
    """Raise ConfigError for an invalid size, colour mode, resize mode or pixel cap."""
    if image_size is not None:
        ok = len(image_size) == 2 and all(
            isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0
            for v in image_size
        )
        if not ok:
            raise ConfigError(
                f"image_size must be two positive integers (height, width), got {image_size!r}."
            )
    if color_mode not in COLOR_MODES:
        raise ConfigError(unknown_name("color mode", str(color_mode), COLOR_MODES))
    if resize not in RESIZE_MODES:
        raise ConfigError(unknown_name("resize mode", str(resize), RESIZE_MODES))
    if max_pixels is not None and (isinstance(max_pixels, bool) or max_pixels < 1):
        raise ConfigError(f"max_pixels must be a positive integer or None, got {max_pixels!r}.")


def read_source(source: Source, max_pixels: int | None, name: str | None) -> tuple[bytes, str]:
    """The bytes of an image source and the name to use in messages; guards size and file type."""
    if isinstance(source, bytes):
        label = name or "<bytes>"
        _check_nonempty(len(source), label)
        return source, label
    path = Path(source)
    label = name or str(path)
    size = _regular_file_size(path, label)
    _check_nonempty(size, label)
    if max_pixels is not None:
        limit = max_pixels * _BYTES_PER_PIXEL_LIMIT + (1 << 20)
        if size > limit:
            raise ImageDecodeError(
                label,
                OVER_SIZE,
                f"the file has {size:,} bytes, more than an image of at most "
                f"{_megapixels(max_pixels)} can take (raise max_pixels if it is genuine)",
            )
    try:
        return path.read_bytes(), label
    except OSError as exc:
        raise ImageDecodeError(
            label, UNREADABLE, f"cannot read the file ({exc.strerror or exc})"
        ) from exc


def decode_bytes(
    data: bytes,
    name: str,
    image_size: tuple[int, int] | None,
    color_mode: str,
    resize: str,
    max_pixels: int | None,
) -> np.ndarray:
    """Decode already-read bytes (settings already validated) into uint8 (C, H, W)."""
    img = open_image(io.BytesIO(data), name, max_pixels)
    if image_size is not None and img.format in ("JPEG", "MPO"):
        side = max(image_size)
        img.draft(None, (side, side))  # decode at a reduced DCT scale, never below (side, side)
    img = load_oriented(img, name)
    img = flatten_to_8bit(img, name)
    if color_mode == "grayscale" and img.mode != "L":
        img = img.convert("L")
    if image_size is not None:
        img = _resize(img, image_size, resize)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:  # (H, W)
        arr = arr[None]
        if color_mode == "rgb":
            arr = np.repeat(arr, 3, axis=0)
        return np.ascontiguousarray(arr)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)


def load_oriented(img: Image.Image, name: str) -> Image.Image:
    """Decode the pixels (first frame) and apply the EXIF orientation; raise ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings are turned into reasons, or moot
            img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            name, OVER_SIZE, f"Pillow refused it as a decompression bomb ({exc})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise decode_failure(name, exc) from exc
    except MemoryError as exc:
        raise ImageDecodeError(name, OVER_SIZE, "not enough memory to decode it") from exc
    with contextlib.suppress(Exception):  # a broken EXIF block must not lose good pixels
        ImageOps.exif_transpose(img, in_place=True)
    return img


def preload_decoders() -> None:
    """Import Pillow's plugins now, once, so that forked decoder processes do not each do it.

    Pillow imports every plugin the first time a file fails to open; opening stays restricted to
    ALLOWED_FORMATS by `open_image` regardless.
    """
    Image.init()


def pixels_text(width: int, height: int) -> str:
    return f"{width}x{height} = {_megapixels(width * height)}"


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"


def _check_nonempty(size: int, name: str) -> None:
    if size == 0:
        raise ImageDecodeError(name, ZERO_BYTE, "the file is empty (0 bytes)")


def _regular_file_size(path: Path, name: str) -> int:
    """Size of a regular file (symlinks followed); anything else (a FIFO, a device) is refused."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        kind = "a broken symbolic link" if path.is_symlink() else "missing"
        raise ImageDecodeError(name, UNREADABLE, f"the file is {kind}") from exc
    except OSError as exc:
        raise ImageDecodeError(
            name, UNREADABLE, f"cannot read the file ({exc.strerror or exc})"
        ) from exc
    if stat.S_ISDIR(st.st_mode):
        raise ImageDecodeError(name, UNREADABLE, "it is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(name, UNREADABLE, "it is not a regular file (a device or a pipe?)")
    return st.st_size


def open_image(handle: BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    """Open an allow-listed image lazily (header only) and enforce the pixel cap."""
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit; `max_pixels` below is the limit that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(handle, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            name, OVER_SIZE, f"Pillow refused it as a decompression bomb ({exc})"
        ) from exc
    except UnidentifiedImageError:
        handle.seek(0)
        raise _unidentified(name, handle.read(64)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise decode_failure(name, exc) from exc
    if img.format not in _ACCEPTED_FORMATS:  # defence in depth: the plugin list is the allow-list
        raise ImageDecodeError(
            name, UNSUPPORTED, f"{img.format} images are not supported (allowed: {_ALLOWED_TEXT})"
        )
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            name,
            OVER_SIZE,
            f"it declares {pixels_text(width, height)}, above the limit of "
            f"{_megapixels(max_pixels)} (max_pixels); a decompression bomb or a huge scan",
        )
    if width < 1 or height < 1:
        raise ImageDecodeError(name, CORRUPT, f"it declares an empty size {width}x{height}")
    return img


def image_header(img: Image.Image) -> ImageHeader:
    """The header facts of an opened image, the size as displayed after EXIF orientation.

    Reads only EXIF found before the pixel data (img.getexif() would decode a whole PNG to look
    for an eXIf chunk after it); decode_image applies the full EXIF orientation either way.
    """
    orientation = 1
    raw = img.info.get("exif")
    if raw:
        exif = Image.Exif()
        try:
            exif.load(raw)
            orientation = int(exif.get(_EXIF_ORIENTATION, 1))
        except Exception:  # a broken EXIF block only loses the orientation
            orientation = 1
    width, height = img.size
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees one way or the other
        width, height = height, width
    return ImageHeader(str(img.format), img.mode, width, height, orientation)


def _unidentified(name: str, head: bytes) -> ImageDecodeError:
    for magic, fmt in _ALLOWED_SIGNATURES:
        if head.startswith(magic) and (fmt != "WEBP" or head[8:12] == b"WEBP"):
            return ImageDecodeError(name, CORRUPT, f"the {fmt} header is damaged")
    for magic, fmt in _KNOWN_UNSUPPORTED:
        if head.startswith(magic):
            return _unsupported(name, fmt)
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return _unsupported(name, "HEIC/AVIF")
    lowered = head.lstrip().lower()
    if lowered.startswith(b"<svg") or (lowered.startswith(b"<?xml") and b"<svg" in lowered):
        return _unsupported(name, "SVG")
    return ImageDecodeError(
        name, NOT_IMAGE, f"not an image: the content is not {_ALLOWED_TEXT} (whatever its name)"
    )


def _unsupported(name: str, fmt: str) -> ImageDecodeError:
    return ImageDecodeError(
        name,
        UNSUPPORTED,
        f"{fmt} images are not supported (allowed: {_ALLOWED_TEXT}); convert it, e.g. to PNG",
    )


def decode_failure(name: str, exc: BaseException) -> ImageDecodeError:
    """Classify a decoder exception as truncated or corrupt, with its message as the reason."""
    text = str(exc) or type(exc).__name__
    lowered = text.lower()
    if any(s in lowered for s in ("truncated", "end of file", "broken data stream", "premature")):
        return ImageDecodeError(name, TRUNCATED, f"the file is truncated ({text})")
    if isinstance(exc, EOFError):
        return ImageDecodeError(name, TRUNCATED, "the file is truncated (unexpected end of data)")
    return ImageDecodeError(name, CORRUPT, f"corrupt image data ({type(exc).__name__}: {text})")


def flatten_to_8bit(img: Image.Image, name: str) -> Image.Image:
    """An 'L' or 'RGB' image from any decoded mode (rules in the module docstring)."""
    mode = img.mode
    has_transparency = "transparency" in img.info
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        has_transparency and mode in ("P", "L", "RGB")
    ):
        return _on_white(img)
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    if mode == "I" or mode.startswith("I;16"):
        return Image.fromarray(_scale_integer(np.asarray(img)), "L")
    if mode == "F":
        return Image.fromarray(_scale_float(np.asarray(img, dtype=np.float64)), "L")
    raise ImageDecodeError(name, UNSUPPORTED, f"pixel mode {mode!r} is not supported")


def _on_white(img: Image.Image) -> Image.Image:
    """Composite a transparent image on an opaque white background."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(background, rgba)
    return flat.convert("L" if img.mode in ("LA", "La") else "RGB")


def _scale_integer(arr: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 with rounding; an int32 image outside that range is min-max scaled."""
    values = arr.astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low >= 0 and high <= 65535:
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    return _min_max(values.astype(np.float64))


def _scale_float(arr: np.ndarray) -> np.ndarray:
    """[0, 1] -> *255; [0, 255] -> rounded; anything else min-max scaled; NaN -> 0."""
    values = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.rint(values).astype(np.uint8)
    return _min_max(values)


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _resize(img: Image.Image, image_size: tuple[int, int], resize: str) -> Image.Image:
    height, width = image_size
    src_w, src_h = img.size
    if (src_w, src_h) == (width, height):
        return img
    bilinear = Image.Resampling.BILINEAR
    if resize == "stretch":
        return img.resize((width, height), bilinear)
    if resize == "crop":
        target_aspect = width / height
        if src_w / src_h > target_aspect:  # too wide: keep the full height
            crop_w = src_h * target_aspect
            box = ((src_w - crop_w) / 2, 0.0, (src_w + crop_w) / 2, float(src_h))
        else:  # too tall: keep the full width
            crop_h = src_w / target_aspect
            box = (0.0, (src_h - crop_h) / 2, float(src_w), (src_h + crop_h) / 2)
        return img.resize((width, height), bilinear, box=box)
    scale = min(width / src_w, height / src_h)  # pad: fit inside, letterbox on black
    new_w = min(width, max(1, round(src_w * scale)))
    new_h = min(height, max(1, round(src_h * scale)))
    canvas = Image.new(img.mode, (width, height), 0)
    canvas.paste(
        img.resize((new_w, new_h), bilinear), ((width - new_w) // 2, (height - new_h) // 2)
    )
    return canvas
