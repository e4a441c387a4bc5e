"""Channel statistics, normalisation and whole-batch shift/flip augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnlab.data.transforms import Augment, augment_batch, channel_stats, normalize
from cnnlab.errors import ConfigError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_batch(n: int = 16, c: int = 3, h: int = 10, w: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def test_channel_stats_match_numpy_and_chunking_is_invisible() -> None:
    images = random_batch(n=37)
    mean, std = channel_stats(images, chunk=5)
    x = images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-10)
    assert channel_stats(images, chunk=1000) == (mean, std)  # integer sums: exact


def test_channel_stats_of_constant_images() -> None:
    images = torch.full((4, 1, 3, 3), 51, dtype=torch.uint8)
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0.2]) and std == pytest.approx([0.0], abs=1e-12)


def test_channel_stats_reject_floats_and_empty() -> None:
    with pytest.raises(ValueError, match="uint8"):
        channel_stats(torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="at least one"):
        channel_stats(torch.zeros(0, 1, 2, 2, dtype=torch.uint8))


def test_normalize_rescales_and_standardises_per_channel() -> None:
    batch = random_batch(n=4, c=2)
    scaled = normalize(batch)
    assert scaled.dtype == torch.float32
    assert torch.equal(scaled, batch.float() / 255)
    out = normalize(batch, [0.5, 0.25], [0.5, 2.0])
    assert torch.allclose(out[:, 0], (batch[:, 0].float() / 255 - 0.5) / 0.5)
    assert torch.allclose(out[:, 1], (batch[:, 1].float() / 255 - 0.25) / 2.0)
    assert torch.equal(batch, random_batch(n=4, c=2))  # input untouched


def test_normalize_keeps_channels_last() -> None:
    batch = random_batch().contiguous(memory_format=torch.channels_last)
    out = normalize(batch, [0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert normalize(random_batch()).is_contiguous()


@pytest.mark.parametrize(
    ("mean", "std", "message"),
    [([0.5], None, "both"), ([0.5], [1.0], "3 values"), ([0, 0, 0], [1, 0, 1], "positive")],
)
def test_normalize_rejects_bad_statistics(mean, std, message) -> None:
    with pytest.raises(ValueError, match=message):
        normalize(random_batch(), mean, std)


def test_augment_settings_are_validated() -> None:
    assert not Augment().enabled and Augment(flip=True).enabled and Augment(shift=0.1).enabled
    assert Augment(shift=0.1).pixels(28, 32) == (3, 3)
    assert Augment(shift=0.125).pixels(8, 16) == (1, 2)
    for bad in (-0.1, 1.0, float("nan"), "0.1", True):
        with pytest.raises(ConfigError, match="shift"):
            Augment(shift=bad)
    with pytest.raises(ConfigError, match="flip"):
        Augment(flip="yes")
    assert Augment(erase=0.5).enabled and not Augment(erase=0.0).enabled
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match="erase"):
            Augment(erase=bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_is_deterministic_per_generator(device: str, dtype: torch.dtype) -> None:
    batch = random_batch().to(device, dtype)
    aug = Augment(shift=0.2, flip=True, erase=0.5)
    first = augment_batch(batch, aug, torch.Generator(device).manual_seed(7))
    again = augment_batch(batch, aug, torch.Generator(device).manual_seed(7))
    other = augment_batch(batch, aug, torch.Generator(device).manual_seed(8))
    assert first.dtype == dtype and first.device.type == device
    assert first.shape == batch.shape
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_no_augmentation_is_identity_on_a_copy() -> None:
    batch = random_batch()
    out = augment_batch(batch, Augment(), torch.Generator().manual_seed(0))
    assert torch.equal(out, batch) and out.data_ptr() != batch.data_ptr()


def test_flip_only_rows_are_identical_or_mirrored_and_both_occur() -> None:
    batch = random_batch(n=64)
    out = augment_batch(batch, Augment(flip=True), torch.Generator().manual_seed(1))
    same = (out == batch).flatten(1).all(1)
    mirrored = (out == batch.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54  # about half flipped (random images: never both)


@pytest.mark.parametrize("device", DEVICES)
def test_shift_moves_a_bright_pixel_by_at_most_p(device: str) -> None:
    n, h, w = 200, 9, 11
    aug = Augment(shift=0.2)  # p = round(0.2 * 9) = 2 down, round(0.2 * 11) = 2 across
    p_h, p_w = aug.pixels(h, w)
    batch = torch.zeros(n, 2, h, w, dtype=torch.uint8, device=device)
    batch[:, :, 4, 5] = 255  # one bright pixel in the middle, in both channels
    out = augment_batch(batch, aug, torch.Generator(device).manual_seed(0)).cpu()
    assert torch.equal(out.flatten(1).sum(1), torch.full((n,), 2 * 255))  # content kept, 1 pixel
    where = out[:, 0].flatten(1).argmax(1)
    dy, dx = where // w - 4, where % w - 5
    assert int(dy.abs().max()) <= p_h and int(dx.abs().max()) <= p_w
    assert set(dy.tolist()) == set(range(-p_h, p_h + 1))  # every offset is drawn
    assert set(dx.tolist()) == set(range(-p_w, p_w + 1))
    assert torch.equal(out[:, 0], out[:, 1])  # both channels moved together


def test_shift_fills_with_zeros_and_keeps_the_rest_of_the_image() -> None:
    batch = random_batch(n=32, c=1, h=8, w=8).clamp_min(1)  # no zero pixels of its own
    out = augment_batch(batch, Augment(shift=0.25), torch.Generator().manual_seed(2))
    for i in range(len(out)):  # check each output is a zero-filled translation of its input
        image, moved = batch[i, 0], out[i, 0]
        rows = torch.nonzero(moved.any(1)).flatten()
        cols = torch.nonzero(moved.any(0)).flatten()
        top, left = int(rows[0]), int(cols[0])
        height, width = len(rows), len(cols)
        dy = top if top > 0 else height - 8  # content moved down (>0) or up (<0)
        dx = left if left > 0 else width - 8
        src = image[max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
        assert torch.equal(moved[top : top + height, left : left + width], src)
        assert int(moved.count_nonzero()) == height * width


def test_erase_zeroes_one_rectangle_of_every_image_across_channels() -> None:
    batch = torch.full((200, 3, 28, 20), 255, dtype=torch.uint8)
    out = augment_batch(batch, Augment(erase=1.0), torch.Generator().manual_seed(3))
    assert torch.equal(out[:, :1].expand_as(out), out)  # the same rectangle in every channel
    areas = []
    for image in out[:, 0] == 0:  # (H, W) masks
        rows, cols = image.any(1).nonzero(), image.any(0).nonzero()
        height, width = len(rows), len(cols)
        assert height and width, "every image is erased with erase=1"
        assert rows.max() - rows.min() + 1 == height and cols.max() - cols.min() + 1 == width
        assert int(image.sum()) == height * width  # a solid rectangle
        areas.append(height * width / (28 * 20))
    assert min(areas) > 0.01 and max(areas) < 0.4  # 2-33% of the image, up to rounding
    assert max(areas) - min(areas) > 0.15  # sizes vary


def test_erase_probability_and_the_rest_of_the_image() -> None:
    batch = random_batch(n=400, c=1, h=16, w=16).clamp(min=1)  # no zero pixels of its own
    out = augment_batch(batch, Augment(erase=0.25), torch.Generator().manual_seed(5))
    erased = (out == 0).flatten(1).any(1)
    assert 70 < int(erased.sum()) < 130  # about a quarter of 400
    assert torch.equal(out[~erased], batch[~erased])
    assert torch.equal(out[out != 0], batch[out != 0])  # only zeroing, nothing moved


def test_augment_keeps_memory_format() -> None:
    g = torch.Generator().manual_seed(0)
    aug = Augment(shift=0.1, flip=True, erase=0.5)
    channels_last = random_batch().contiguous(memory_format=torch.channels_last)
    assert augment_batch(channels_last, aug, g).is_contiguous(memory_format=torch.channels_last)
    assert augment_batch(random_batch(), aug, g).is_contiguous()


def test_augment_rejects_generator_on_other_device_and_bad_shape() -> None:
    class FakeGenerator:
        device = torch.device("meta")

    with pytest.raises(ValueError, match="generator is on meta"):
        augment_batch(random_batch(), Augment(flip=True), FakeGenerator())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        augment_batch(torch.zeros(3, 4, 4), Augment(flip=True), torch.Generator())
