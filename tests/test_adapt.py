"""The encoder adaptations for transfer are exact where they should be."""

import pytest
import torch

from pipeline import checkpoint
from pipeline.adapt import adapt_encoder, inflate_patch_weight
from pipeline.model import Classifier, Encoder, ViTConfig, sincos_pos_embed_2d


def _encoder(channels, size=16, patch=4, mean=0.3, std=0.2):
    torch.manual_seed(0)
    enc = Encoder(ViTConfig(size, channels, patch, 32, 2, 4, mean=(mean,) * channels, std=(std,) * channels))
    # Non-trivial weights everywhere, not just the initialisation's zeros.
    with torch.no_grad():
        for prm in enc.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    # float64, so "exact" can be checked to 1e-10 instead of float32 rounding.
    return enc.double().eval()


def test_gray_to_rgb_gives_a_gray_image_the_same_embedding_and_features():
    gray = _encoder(1)
    rgb = adapt_encoder(gray, 3, 16, (0.3,) * 3, (0.2,) * 3).double().eval()
    x = torch.rand(5, 1, 16, 16, dtype=torch.float64)
    x3 = x.expand(-1, 3, -1, -1)
    torch.testing.assert_close(rgb.tokens(x3), gray.tokens(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(rgb(x3), gray(x), rtol=0, atol=1e-10)
    # Before fine-tuning, a colour image looks like its channel mean: colour is learned downstream.
    c = torch.rand(5, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(rgb.tokens(c), gray.tokens(c.mean(1, keepdim=True)), rtol=0, atol=1e-10)


def test_rgb_to_gray_sums_over_colours():
    rgb = _encoder(3)
    gray = adapt_encoder(rgb, 1, 16, (0.3,), (0.2,)).double().eval()
    x = torch.rand(5, 1, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(gray.tokens(x), rgb.tokens(x.expand(-1, 3, -1, -1)), rtol=0, atol=1e-10)
    torch.testing.assert_close(gray(x), rgb(x.expand(-1, 3, -1, -1)), rtol=0, atol=1e-10)


def test_inflation_follows_the_patch_pixel_order():
    # Patch vectors are (row, column, channel): colour c of pixel k is column k * C + c.
    w = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4)  # dim 2, patch 2, 1 channel
    w3 = inflate_patch_weight(w, 2, 1, 3)
    assert w3.shape == (2, 12)
    torch.testing.assert_close(w3[:, 0::3], w / 3)
    torch.testing.assert_close(w3[:, 2::3], w / 3)
    torch.testing.assert_close(inflate_patch_weight(w3, 2, 3, 1), w)
    with pytest.raises(ValueError, match="only 1 <-> C"):
        inflate_patch_weight(torch.zeros(2, 12), 2, 3, 2)


def test_same_grid_is_the_identity():
    enc = _encoder(1)
    same = adapt_encoder(enc, 1, 16, (0.3,), (0.2,)).double().eval()
    assert same.cfg == enc.cfg
    assert torch.equal(same.pos_embed, enc.pos_embed)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    assert torch.equal(same(x), enc(x))
    assert torch.equal(sincos_pos_embed_2d(32, 7, 7), sincos_pos_embed_2d(32, 7))


def test_new_grid_resamples_positions_over_the_same_image():
    old, new = sincos_pos_embed_2d(32, 7).reshape(7, 7, 32), sincos_pos_embed_2d(32, 21, 7).reshape(21, 21, 32)
    # 7 -> 21 patches: the centre of new patch 3i+1 is the centre of old patch i.
    torch.testing.assert_close(new[1::3, 1::3], old, rtol=0, atol=1e-6)
    # 7 -> 8 (28 -> 32 pixels at patch 4): corners move inwards, not off the learned range.
    eight = sincos_pos_embed_2d(32, 8, 7).reshape(8, 8, 32)
    assert eight.shape == (8, 8, 32) and not torch.allclose(eight[:7, :7], old)
    enc = _encoder(1, size=28, patch=4)
    big = adapt_encoder(enc, 1, 32, (0.3,), (0.2,)).eval()
    assert big.cfg.grid == 8 and big.cfg.pos_grid == 7
    assert big.float()(torch.rand(2, 1, 32, 32)).shape == (2, 1 + 64, 32)
    # Adapting back to the pretraining size restores the original table exactly.
    back = adapt_encoder(big, 1, 28, (0.3,), (0.2,))
    assert back.cfg.pos_grid == 0 and torch.equal(back.pos_embed, enc.float().pos_embed)
    with pytest.raises(ValueError, match="not a multiple"):
        adapt_encoder(enc, 1, 30, (0.3,), (0.2,))


def test_adapted_encoder_round_trips_through_a_checkpoint(tmp_path):
    big = adapt_encoder(_encoder(1, size=28, patch=4).float(), 3, 32, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    clf = Classifier(big, 10, pool="mean").eval()
    head = {"num_classes": 10, "head": "linear", "pool": "mean", "mlp_hidden": 512}
    checkpoint.save(tmp_path / "c.pt", checkpoint.classifier_payload(clf, head, stage="finetune"))
    again = checkpoint.build_classifier(checkpoint.load(tmp_path / "c.pt")).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x), clf(x)) and again.encoder.cfg == big.cfg
