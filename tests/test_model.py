import math

import pytest
import torch

from pipeline.model import (
    MAE,
    Classifier,
    Encoder,
    ViTConfig,
    count_parameters,
    masked_pixel_sse,
    num_visible,
    patchify,
    random_masking,
    sincos_pos_embed_2d,
    unpatchify,
)


def cfg(patch=4, size=16, channels=1, dim=32, depth=1, heads=2):
    return ViTConfig(size, channels, patch, dim, depth, heads, mean=(0.5,) * channels, std=(0.25,) * channels)


def test_patchify_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 4 * 4 * 3)
    # Patch 1 is the top-right 4x4 block; its first pixel's channels come first.
    assert p[0, 1, :3].tolist() == [x[0, c, 0, 4].item() for c in range(3)]
    assert torch.equal(unpatchify(p, 4, 3), x)


def test_sincos_positions():
    pe = sincos_pos_embed_2d(16, 3)
    assert pe.shape == (9, 16)
    # Position (0, 0): every sine is 0, every cosine is 1.
    assert torch.allclose(pe[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    # Same row => same y half; same column => same x half.
    assert torch.equal(pe[1, 8:], pe[2, 8:]) and torch.equal(pe[0, :8], pe[3, :8])
    assert len({tuple(r.tolist()) for r in pe}) == 9
    # First x frequency is 1 rad per patch.
    assert math.isclose(pe[1, 0].item(), math.sin(1.0), rel_tol=1e-6)
    with pytest.raises(ValueError):
        sincos_pos_embed_2d(10, 3)


@pytest.mark.parametrize(
    "patches,ratio,visible", [(196, 0.3, 138), (49, 0.9, 5), (4, 0.9, 1), (4, 0.5, 2), (16, 0.75, 4)]
)
def test_num_visible(patches, ratio, visible):
    assert num_visible(patches, ratio) == visible


def test_random_masking_per_sample():
    torch.manual_seed(0)
    keep, restore, mask = random_masking(5, 16, 0.75, torch.device("cpu"))
    assert keep.shape == (5, 4) and mask.shape == (5, 16)
    assert mask.sum(1).tolist() == [12.0] * 5
    for b in range(5):
        # Kept indices are exactly the unmasked positions, and each sample differs.
        assert sorted(keep[b].tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()
    assert len({tuple(sorted(k.tolist())) for k in keep}) > 1
    # restore undoes the shuffle: it is a permutation, and it sends each kept patch back from the
    # front of the shuffled order (position i of `keep` came from shuffled position i).
    for r in range(5):
        assert sorted(restore[r].tolist()) == list(range(16))
    assert torch.equal(torch.gather(restore, 1, keep), torch.arange(4).expand(5, 4))
    assert torch.equal(mask, (restore >= 4).float())
    # The decoder's unshuffle: tokens laid out as [kept..., mask tokens...] and gathered by restore
    # put every kept token back at its own patch and a mask token everywhere else.
    laid_out = torch.cat([keep, torch.full((5, 12), -1)], dim=1)
    placed = torch.gather(laid_out, 1, restore)
    assert torch.equal(placed, torch.where(mask == 0, torch.arange(16).expand(5, 16), -1))
    # A generator makes the draw repeatable.
    a = random_masking(3, 16, 0.5, torch.device("cpu"), torch.Generator().manual_seed(1))
    b = random_masking(3, 16, 0.5, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_encoder_shapes():
    enc = Encoder(cfg())
    x = torch.rand(3, 1, 16, 16)
    assert enc(x).shape == (3, 1 + 16, 32)
    keep = torch.tensor([[0, 5], [1, 2], [3, 15]])
    assert enc(x, keep).shape == (3, 3, 32)


@pytest.mark.parametrize("loss", ["mse", "norm_pix", "bce"])
def test_mae_forward_and_loss_only_on_masked(loss):
    torch.manual_seed(0)
    mae = MAE(cfg(channels=3), 0.75, decoder_dim=16, decoder_depth=1, decoder_heads=2, loss=loss)
    x = torch.rand(4, 3, 16, 16)
    out = mae(x)
    assert out["pred"].shape == (4, 16, 48) and torch.isfinite(out["loss"])
    # Changing the prediction on visible patches must not change the loss.
    tampered = out["pred"] + (1 - out["mask"]).unsqueeze(-1) * 100.0
    assert torch.allclose(mae.loss(tampered, out["target"], out["mask"]), out["loss"])
    # Back to [0, 1] pixels by each loss's own inverse: a sigmoid for bce, the target patch's
    # mean and std for norm_pix (its prediction is relative to them), a clamp for mse.
    pred, target = out["pred"].detach(), out["target"]
    pixels = mae.to_pixels(pred, target)
    if loss == "bce":
        expected = 1 / (1 + torch.exp(-pred))
    elif loss == "norm_pix":
        expected = (pred * target.std(-1, keepdim=True) + target.mean(-1, keepdim=True)).clamp(0, 1)
    else:
        expected = pred.clamp(0, 1)
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=1e-4)
    # A perfect norm_pix prediction is the normalised target, and gives the target's pixels back.
    if loss == "norm_pix":
        perfect = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True)
        torch.testing.assert_close(mae.to_pixels(perfect, target), target, atol=1e-3, rtol=1e-4)
    out["loss"].backward()
    assert mae.encoder.patch_embed.weight.grad is not None


def test_mse_loss_value():
    mae = MAE(cfg(), 0.5, decoder_dim=16, decoder_depth=1, decoder_heads=2, loss="mse")
    target = torch.zeros(1, 4, 2)
    pred = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    assert mae.loss(pred, target, mask).item() == pytest.approx((1 + 9) / 2)
    sse, n = masked_pixel_sse(pred, target, mask)
    assert sse.item() == 2 * 1 + 2 * 9 and n.item() == 4


def test_classifier_heads_and_pools():
    enc = Encoder(cfg(dim=64, heads=4))
    x = torch.rand(5, 1, 16, 16)
    lin = Classifier(enc, 10, head="linear", pool="cls")
    mlp = Classifier(enc, 10, head="mlp", pool="mean", mlp_hidden=100)
    assert lin(x).shape == (5, 10) and mlp(x).shape == (5, 10)
    assert count_parameters(lin.head) == 64 * 10 + 10  # the BatchNorm is non-affine
    assert count_parameters(mlp.head) == 64 * 100 + 100 + 100 * 10 + 10
    with pytest.raises(ValueError):
        Classifier(enc, 10, head="conv")


def test_normalisation_uses_config_mean_std():
    c = cfg()
    enc = Encoder(c)
    x = torch.full((1, 1, 16, 16), 0.5)  # equals the mean -> zero input to the patch embedding
    tokens = enc.tokens(x)
    assert torch.allclose(tokens, enc.patch_embed.bias + enc.pos_embed, atol=1e-6)


def test_drop_path_rises_with_depth_and_only_acts_in_training():
    from pipeline.model import drop_path

    enc = Encoder(ViTConfig(16, 1, 4, 32, 3, 2))
    enc.set_drop_path(0.2)
    assert [b.drop_path for b in enc.blocks] == pytest.approx([0.0, 0.1, 0.2])
    x = torch.ones(10000, 3)
    kept = drop_path(x, 0.25, training=True)
    rows = kept[:, 0]
    assert rows.unique().tolist() == pytest.approx([0.0, 4 / 3])  # whole samples dropped, the rest rescaled
    assert torch.equal(kept, kept[:, :1].expand_as(kept))
    assert rows.mean().item() == pytest.approx(1.0, abs=0.03)  # expectation unchanged
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    images = torch.rand(4, 1, 16, 16)
    enc.eval()
    assert torch.equal(enc(images), enc(images))  # eval: deterministic, no path dropped
