"""Safe decoding of single image files: formats, modes, orientation, resizing and refusals."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from cnnlab.data.images import (
    CORRUPT,
    NOT_IMAGE,
    OVER_SIZE,
    TRUNCATED,
    UNREADABLE,
    UNSUPPORTED,
    ZERO_BYTE,
    ImageDecodeError,
    decode_image,
    flatten_to_8bit,
    probe_image,
)
from cnnlab.errors import ConfigError, DataError


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A PNG signature and IHDR chunk declaring a size, with no pixel data at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def noisy_jpeg(size: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "JPEG")


def test_16bit_png_is_scaled_not_saturated() -> None:
    data = encode(Image.fromarray(np.array([[0, 32768, 65535, 257]], dtype=np.uint16)), "PNG")
    grey = decode_image(data, color_mode="grayscale")
    assert grey.dtype == np.uint8 and grey.shape == (1, 1, 4)
    assert grey[0, 0].tolist() == [0, 128, 255, 1]
    rgb = decode_image(data, color_mode="rgb")
    assert rgb.shape == (3, 1, 4) and (rgb == grey).all()


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red
    out = decode_image(data)
    assert out.shape == (3, 8, 8)
    r, g, b = (int(out[c].mean()) for c in range(3))
    assert r > 230 and g < 30 and b < 30


def test_rgba_transparency_is_composited_on_white() -> None:
    pixels = np.array(
        [[[0, 0, 0, 0], [255, 0, 0, 255], [0, 0, 255, 128]]], dtype=np.uint8
    )  # transparent black, opaque red, half-transparent blue
    out = decode_image(encode(Image.fromarray(pixels, "RGBA"), "PNG"))
    assert out[:, 0, 0].tolist() == [255, 255, 255]
    assert out[:, 0, 1].tolist() == [255, 0, 0]
    assert out[0, 0, 2] == out[1, 0, 2] and 120 <= out[0, 0, 2] <= 135 and out[2, 0, 2] == 255


def test_la_transparency_gives_white_grey() -> None:
    la = Image.fromarray(np.array([[[0, 0], [40, 255]]], dtype=np.uint8), "LA")
    out = decode_image(encode(la, "PNG"), color_mode="grayscale")
    assert out[0, 0].tolist() == [255, 40]


def test_palette_with_transparency_is_composited_on_white() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.putdata([0, 1])
    out = decode_image(encode(img, "PNG", transparency=0))
    assert out[:, 0, 0].tolist() == [255, 255, 255]  # transparent index
    assert out[:, 0, 1].tolist() == [255, 0, 0]


def test_exif_orientation_6_is_applied() -> None:
    stored = np.zeros((8, 16), dtype=np.uint8)  # 16 wide, 8 tall: left half white
    stored[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, color_mode="grayscale")
    assert out.shape == (1, 16, 8)  # displayed upright: 8 wide, 16 tall
    assert out[0, :7].mean() > 240 and out[0, 9:].mean() < 15  # the left half is now on top
    header = probe_image(data)
    assert (header.width, header.height, header.orientation) == (8, 16, 6)


def test_one_bit_and_float_and_int_modes() -> None:
    one_bit = Image.new("1", (2, 1))
    one_bit.putpixel((1, 0), 1)
    assert decode_image(encode(one_bit, "PNG"), color_mode="grayscale")[0, 0].tolist() == [0, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(flatten_to_8bit(unit, "f")).tolist() == [[0, 128, 255]]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 990.0]], dtype=np.float32))  # min-max scaled
    assert np.asarray(flatten_to_8bit(wide, "f")).tolist() == [[0, 3, 255]]
    big = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert big.mode == "I" and np.asarray(flatten_to_8bit(big, "i")).tolist() == [[0, 255]]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_allowed_formats_decode(fmt: str) -> None:
    img = Image.new("RGB", (6, 4), (200, 200, 200))
    out = decode_image(encode(img, fmt), image_size=(2, 3))
    assert out.shape == (3, 2, 3) and abs(int(out.mean()) - 200) <= 6


def test_content_decides_not_the_extension(tmp_path: Path) -> None:
    png_named_jpg = tmp_path / "photo.jpg"
    png_named_jpg.write_bytes(encode(Image.new("L", (3, 2), 7), "PNG"))
    assert decode_image(png_named_jpg, color_mode="grayscale").tolist() == [[[7, 7, 7], [7, 7, 7]]]
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(text)
    assert err.value.kind == NOT_IMAGE and "notes.jpg" in str(err.value)
    assert isinstance(err.value, DataError)


def test_missing_file_and_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"missing\.png: the file is missing") as err:
        decode_image(tmp_path / "missing.png")
    assert err.value.kind == UNREADABLE
    with pytest.raises(ImageDecodeError, match="it is a folder"):
        decode_image(tmp_path)


def test_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buffer.getvalue())
    assert out[0].min() > 240 and out[2].max() < 15


def test_zero_byte_and_truncated_and_unsupported(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(noisy_jpeg()[:900])
    tiff = tmp_path / "scan.png"
    tiff.write_bytes(encode(Image.new("RGB", (4, 4)), "TIFF"))
    expected = {empty: ZERO_BYTE, truncated: TRUNCATED, tiff: UNSUPPORTED}
    for path, kind in expected.items():
        with pytest.raises(ImageDecodeError) as err:
            decode_image(path)
        assert err.value.kind == kind, err.value
        assert path.name in str(err.value)
    assert "TIFF" in decode_error(tiff).reason


def decode_error(path: Path) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as err:
        decode_image(path)
    return err.value


def test_corrupt_png_data() -> None:
    good = encode(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)), "PNG")
    at = good.index(b"IDAT") + 8
    bad = good[:at] + bytes(b ^ 0xFF for b in good[at : at + 10]) + good[at + 10 :]
    with pytest.raises(ImageDecodeError) as err:
        decode_image(bad, name="broken.png")
    assert err.value.kind in (CORRUPT, TRUNCATED) and "broken.png" in str(err.value)


def test_pixel_bomb_is_rejected_from_the_header_without_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    huge = png_header_only(20000, 20000)  # 400 megapixels: Pillow's own bomb limit too
    with pytest.raises(ImageDecodeError) as err:
        decode_image(huge, name="bomb.png")
    assert err.value.kind == OVER_SIZE and "bomb.png" in str(err.value)
    medium = png_header_only(5000, 5000)  # 25 megapixels: only our max_pixels stops it
    with pytest.raises(ImageDecodeError) as err:
        decode_image(medium, max_pixels=1_000_000)
    assert err.value.kind == OVER_SIZE and "5000x5000" in err.value.reason


def test_resize_modes() -> None:
    stripes = np.zeros((4, 12), dtype=np.uint8)  # black | white | black, 12 wide, 4 tall
    stripes[:, 4:8] = 255
    data = encode(Image.fromarray(stripes), "PNG")
    crop = decode_image(data, (4, 4), "grayscale", "crop")
    assert (crop == 255).all()  # the centre square only
    stretch = decode_image(data, (4, 4), "grayscale", "stretch")
    assert 0 < stretch.mean() < 255 and stretch[0, :, 0].max() < 128
    white = encode(Image.new("L", (8, 4), 255), "PNG")
    pad = decode_image(white, (8, 8), "grayscale", "pad")
    assert (pad[0, 2:6] == 255).all() and (pad[0, :2] == 0).all() and (pad[0, 6:] == 0).all()


def test_invalid_settings_are_config_errors() -> None:
    data = encode(Image.new("L", (2, 2)), "PNG")
    with pytest.raises(ConfigError, match="Did you mean 'grayscale'"):
        decode_image(data, color_mode="greyscale")
    with pytest.raises(ConfigError, match="resize mode"):
        decode_image(data, resize="fit")
    with pytest.raises(ConfigError, match="image_size"):
        decode_image(data, image_size=(0, 4))
