import math

import pytest
import torch
import torch.nn as nn

from pipeline import engine
from pipeline.errors import UserError


def test_lars_step_matches_hand_computation():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))   # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = engine.LARS([{"params": [w, b], "lr": 0.5, "weight_decay": 0.1}], lr=0.5)
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0])
    opt.step()
    update = torch.tensor([[0.3, 1.4]])             # grad + 0.1 * w
    ratio = 0.001 * 5.0 / update.norm()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * ratio * update)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 0.001 * 2.0]))  # 1-D: lr * trust, no decay
    # Second step: momentum accumulates.
    w.grad, b.grad = torch.zeros_like(w), torch.tensor([2.0])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 0.001 * (2.0 + 0.9 * 2.0 + 2.0)]))


def test_warmup_cosine():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = engine.warmup_cosine(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_param_groups_exclude_norms_and_tokens():
    from pipeline.model import Encoder, ViTConfig

    enc = Encoder(ViTConfig(16, 1, 4, 32, 1, 2))
    decay, no_decay = engine.param_groups(enc, 0.1, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert any(p is enc.cls_token for p in no_decay["params"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(UserError, match="device = 'cuda'"):
        engine.resolve_device("cuda")
    assert engine.resolve_device("auto").type in ("cpu", "mps")


def _toy_fit(lr: float, seed: int = 0):
    torch.manual_seed(seed)
    device = torch.device("cpu")
    x = torch.randn(64, 3)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(3, 2)
    opt = engine.make_optimizer("sgd", engine.param_groups(model, lr, 0.0), device)
    return engine.fit_classifier(stage="toy", module=model, forward=model, optimizer=opt, x_train=x, y_train=y,
                                 x_val=x, y_val=y, epochs=3, batch_size=16, warmup_epochs=0.5, device=device,
                                 seed=seed, on_epoch=lambda e, m: None)


def test_fit_is_deterministic_and_learns():
    a, b = _toy_fit(0.5), _toy_fit(0.5)
    assert a == b
    assert a[-1]["val_acc"] > 0.8 and a[-1]["train_loss"] < a[0]["train_loss"]


def test_nan_loss_stops_with_clear_error():
    with pytest.raises(engine.Diverged, match=r"toy: the training loss became (nan|inf) in epoch \d"):
        _toy_fit(float(1e38))


def test_unknown_optimizer():
    with pytest.raises(UserError, match="optimizer"):
        engine.make_optimizer("adagrad", [{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0}],
                              torch.device("cpu"))


def test_batch_indices_cover_each_sample_once():
    g = torch.Generator().manual_seed(0)
    chunks = engine.batch_indices(100, 32, torch.device("cpu"), g)
    # 100 = 3 * 32 + 4: the 4-sample tail is dropped (BatchNorm on 4 samples is noise).
    assert [len(c) for c in chunks] == [32, 32, 32]
    assert len(set(torch.cat(chunks).tolist())) == 96
    assert [len(c) for c in engine.batch_indices(80, 32, torch.device("cpu"), g)] == [32, 32, 16]
