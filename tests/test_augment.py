"""pipeline.augment on real tensors: exactness of flip/shift, crop sanity, determinism."""

from __future__ import annotations

import pytest
import torch

from pipeline.augment import AUGMENTS, augment


def _images(b, c=1, size=28, seed=0):
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _shifted(img, dx, dy):
    """img [C, H, W] translated by (dx, dy) pixels, vacated pixels zero."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = img[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_empty_ops_returns_same_object():
    x = _images(4)
    gen = _gen(0)
    state = gen.get_state()
    assert augment(x, (), gen) is x
    assert torch.equal(gen.get_state(), state)  # no random numbers drawn


def test_flip_is_exact_and_both_cases_occur():
    x = _images(200, size=8)
    y = augment(x, ("flip",), _gen(1))
    same = (y - x).abs().flatten(1).amax(1) <= 1e-6
    flipped = (y - x.flip(-1)).abs().flatten(1).amax(1) <= 1e-6
    assert bool((same | flipped).all())
    assert bool(same.any()) and bool(flipped.any())


@pytest.mark.parametrize("size,s", [(28, 2), (32, 3)])
def test_shift_is_exact_integer_translation(size, s):
    x = _images(48, c=2, size=size)
    y = augment(x, ("shift",), _gen(2))
    seen = set()
    for img, out in zip(x, y):
        matches = [
            (dx, dy)
            for dx in range(-s, s + 1)
            for dy in range(-s, s + 1)
            if torch.allclose(out, _shifted(img, dx, dy), atol=1e-6, rtol=0)
        ]
        assert matches, "output is not an integer shift of the input within range"
        seen.update(matches)
    assert len(seen) > 5  # shifts actually vary across samples
    assert max(max(abs(dx), abs(dy)) for dx, dy in seen) == s  # the full range is used


def test_crop_sanity():
    x = _images(32, c=3)
    y = augment(x, ("crop",), _gen(3))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert not torch.equal(y, x)
    # Same input image in every slot: different crops must give different outputs.
    same = x[:1].expand(16, -1, -1, -1).contiguous()
    z = augment(same, ("crop",), _gen(4))
    assert (z[1:] - z[:1]).abs().flatten(1).amax(1).min() > 1e-3

    const = torch.full((8, 3, 28, 28), 0.37)
    assert torch.allclose(augment(const, ("crop",), _gen(5)), const, atol=1e-6)


def test_determinism():
    x = _images(16, c=3)
    ops = ("crop", "flip", "shift")
    a = augment(x, ops, _gen(7))
    b = augment(x, ops, _gen(7))
    c = augment(x, ops, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_combined_and_unknown_op():
    x = _images(8, c=3, size=32)
    y = augment(x, AUGMENTS, _gen(9))
    assert y.shape == x.shape and y.dtype == x.dtype and y is not x
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    with pytest.raises(ValueError, match="rotate"):
        augment(x, ("flip", "rotate"))


def test_multichannel_flip_and_shift_move_channels_together():
    x = _images(64, c=3)
    y = augment(x, ("flip", "shift"), _gen(10))
    for img, out in zip(x, y):
        assert any(
            torch.allclose(out, _shifted(src, dx, dy), atol=1e-6, rtol=0)
            for src in (img, img.flip(-1))
            for dx in range(-2, 3)
            for dy in range(-2, 3)
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_on_device_without_host_sync():
    x = _images(64, c=3).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = augment(x, AUGMENTS, gen)
        z = augment(x, ("flip", "shift"), gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.device == x.device and y.shape == x.shape
    assert torch.equal(augment(x, AUGMENTS, torch.Generator(device="cuda").manual_seed(0)), y)
    assert z.device == x.device
