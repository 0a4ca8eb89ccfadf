"""The runtime (device, compile fallback), the optimizers and schedules, and the training loop."""

import math
import os
import shutil

import pytest
import torch
import torch.nn as nn

from pipeline import loop, optim, runtime
from pipeline.errors import UserError


def test_lars_step_matches_hand_computation():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = optim.LARS([{"params": [w, b], "lr": 0.5, "weight_decay": 0.1}], lr=0.5)
    w.grad = torch.tensor([[0.0, 1.0]])
    b.grad = torch.tensor([2.0])
    opt.step()
    update = torch.tensor([[0.3, 1.4]])  # grad + 0.1 * w
    ratio = 0.001 * 5.0 / update.norm()
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * ratio * update)
    # 1-D (biases): the plain momentum step at the full lr, no trust ratio, no decay (as in MAE's LARS).
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))
    # Second step: momentum accumulates.
    w.grad, b.grad = torch.zeros_like(w), torch.tensor([2.0])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0 - 0.5 * (0.9 * 2.0 + 2.0)]))


def test_layer_decay_groups_scale_lr_by_depth():
    from pipeline.model import Encoder, ViTConfig

    enc = Encoder(ViTConfig(16, 1, 4, 32, 3, 2))
    groups = optim.layer_decay_groups(enc, 1.0, 0.05, 0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in enc.parameters())  # every parameter, once
    # 3 blocks: embedding 0.5^4, block i (0-based) 0.5^(3 - i), final norm 0.5^0.
    assert lr_of[id(enc.patch_embed.weight)] == (0.5**4, 0.05)
    assert lr_of[id(enc.cls_token)] == (0.5**4, 0.0)
    for i, block in enumerate(enc.blocks):
        assert lr_of[id(block.attn.qkv.weight)] == (0.5 ** (3 - i), 0.05)
        assert lr_of[id(block.norm1.bias)] == (0.5 ** (3 - i), 0.0)
    assert lr_of[id(enc.norm.weight)] == (1.0, 0.0)
    assert {g["lr"] for g in optim.layer_decay_groups(enc, 2.0, 0.05, 1.0)} == {2.0}


def test_fixed_steps_stream_full_batches_across_permutations():
    gen = torch.Generator().manual_seed(0)
    stream = loop.BatchStream(10, 4, torch.device("cpu"), gen)
    batches = [next(stream) for _ in range(5)]  # 20 indices: exactly two permutations of 10
    assert all(len(b) == 4 for b in batches)
    flat = torch.cat(batches)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    # Its state is what is left of the current permutation: a copy carried on from it (as a resumed
    # run does) draws exactly what the original draws next.
    other = loop.BatchStream(10, 4, torch.device("cpu"), torch.Generator().manual_seed(0))
    other.generator.set_state(gen.get_state())
    other.rest = stream.rest.clone()
    assert all(torch.equal(next(stream), next(other)) for _ in range(4))


def test_warmup_cosine():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = optim.warmup_cosine(opt, total_steps=10, warmup_steps=2)
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
    decay, no_decay = optim.param_groups(enc, 0.1, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"])
    assert any(p is enc.cls_token for p in no_decay["params"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(UserError, match="device = 'cuda'"):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device("auto").type in ("cpu", "mps")


def _toy_fit(lr: float, seed: int = 0, n: int = 64, epochs: int = 3, batch_size: int = 16):
    torch.manual_seed(seed)
    device = torch.device("cpu")
    x = torch.randn(n, 3)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(3, 2)
    opt = optim.make_optimizer("sgd", optim.param_groups(model, lr, 0.0), device)
    return loop.fit_classifier(
        stage="toy",
        module=model,
        forward=model,
        optimizer=opt,
        x_train=x,
        y_train=y,
        x_val=x,
        y_val=y,
        epochs=epochs,
        batch_size=batch_size,
        warmup_epochs=0.5,
        device=device,
        seed=seed,
        on_epoch=lambda e, m: None,
    )


def test_fit_is_deterministic_and_learns():
    a, b = _toy_fit(0.5), _toy_fit(0.5)
    assert a == b
    assert a[-1]["val_acc"] > 0.8 and a[-1]["train_loss"] < a[0]["train_loss"]


def test_nan_loss_stops_with_clear_error():
    with pytest.raises(loop.Diverged, match=r"toy: the training loss became (nan|inf) in epoch \d"):
        _toy_fit(1e38)


def test_unknown_optimizer():
    with pytest.raises(UserError, match="optimizer"):
        optim.make_optimizer("adagrad", [{"params": [nn.Parameter(torch.zeros(1))], "lr": 1.0}], torch.device("cpu"))


def test_batch_indices_cover_each_sample_once():
    g = torch.Generator().manual_seed(0)
    chunks = loop.batch_indices(100, 32, torch.device("cpu"), g)
    # 100 = 3 * 32 + 4: the ragged tail is dropped, so every step has one shape.
    assert [len(c) for c in chunks] == [32, 32, 32]
    assert len(set(torch.cat(chunks).tolist())) == 96
    assert [len(c) for c in loop.batch_indices(80, 32, torch.device("cpu"), g)] == [32, 32]
    # Fewer samples than a batch: one batch of all of them, not an empty epoch.
    assert [len(c) for c in loop.batch_indices(10, 32, torch.device("cpu"), g)] == [10]


def test_lr_is_per_256_images():
    assert optim.scaled_lr(4e-3, 128) == 2e-3
    assert optim.scaled_lr(4.0, 256) == 4.0
    assert optim.scaled_lr(1e-3, 1024) == pytest.approx(4e-3)


def test_compile_auto_is_cuda_only():
    assert runtime.want_compile("auto", torch.device("cuda")) is True
    assert runtime.want_compile("auto", torch.device("cpu")) is False
    assert runtime.want_compile(True, torch.device("cpu")) is True
    assert runtime.want_compile(False, torch.device("cuda")) is False


# A tiny ViT classifier trained for two epochs, in a fresh process: torch.compile's caches and
# inductor's compiler setting are per process, and each run gets its own cache directory so it
# really compiles.
_VIT_FIT = """
import json, sys, torch
from pipeline import loop, optim, runtime
from pipeline.model import Classifier, Encoder, ViTConfig
torch.manual_seed(0)
device = torch.device("cpu")
x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
y = (x.float().mean((1, 2, 3)) > 127.5).long()
clf = Classifier(Encoder(ViTConfig(8, 1, 4, 16, 1, 2)), 2, pool="mean")
opt = optim.make_optimizer("adamw", optim.param_groups(clf, 1e-3, 0.05), device)
net = runtime.Compiled(clf, sys.argv[1] == "true", "toy")
hist = loop.fit_classifier(stage="toy", module=clf, forward=lambda u8: net(runtime.as_float(u8)),
                             eval_forward=lambda u8: clf(runtime.as_float(u8)), optimizer=opt,
                             x_train=x, y_train=y, x_val=x, y_val=y, epochs=2, batch_size=16,
                             warmup_epochs=0, device=device, seed=0, on_epoch=lambda e, m: None)
print("HISTORY", json.dumps(hist))
"""


def _vit_fit(compile_on: bool, tmp_path, **env):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    full_env = {**os.environ, "PYTHONPATH": str(root), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), **env}
    proc = subprocess.run(
        [sys.executable, "-c", _VIT_FIT, "true" if compile_on else "false"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("HISTORY ")][-1]
    return json.loads(line[len("HISTORY ") :]), proc.stderr


_NO_CXX = shutil.which(os.environ.get("CXX", "g++")) is None


@pytest.mark.skipif(_NO_CXX, reason="torch.compile on the CPU needs a C++ compiler (g++)")
def test_compiled_training_matches_eager(tmp_path):
    """The real inductor compile on the CPU: the same losses as eager up to float reassociation
    (a classifier draws no random numbers inside the model, so nothing else may differ)."""
    eager, _ = _vit_fit(False, tmp_path)
    compiled, err = _vit_fit(True, tmp_path)
    assert "torch.compile failed" not in err
    for e, c in zip(eager, compiled):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert c["val_loss"] == pytest.approx(e["val_loss"], rel=1e-4)


def test_failed_compile_falls_back_to_eager(tmp_path):
    """No working C++ compiler: inductor cannot build its kernels. One note, then eager training
    from that same step, which gives exactly the eager run's numbers."""
    eager, _ = _vit_fit(False, tmp_path)
    fallback, err = _vit_fit(True, tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    notes = [ln for ln in err.splitlines() if "torch.compile failed" in ln]
    assert len(notes) == 1 and notes[0].startswith("maepipe: note: toy: torch.compile failed ("), err[-2000:]
    assert "compile: false" in notes[0]
    assert fallback == eager


def test_only_a_first_call_compile_failure_falls_back():
    """The wrapper owns its fallback: a compile failure in the first call is noted and the same
    call made eagerly; an out-of-memory error or a bug surfaces as it is, and nothing falls back
    once a call has completed."""
    from torch._dynamo.exc import TorchDynamoException

    def failing(error):
        def fn(*args):
            raise error

        return fn

    eager = nn.Linear(2, 2)
    x = torch.randn(3, 2)
    net = runtime.Compiled(eager, True, "toy")
    net.fn = failing(TorchDynamoException("inductor could not build a kernel"))
    torch.testing.assert_close(net(x), eager(x))  # redone eagerly
    assert (net.active, net.settled, net.fn) == (False, True, eager)

    net = runtime.Compiled(eager, True, "toy")
    net.fn = failing(RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        net(x)
    assert net.active and not net.settled

    net = runtime.Compiled(eager, True, "toy")
    net.fn = eager
    net(x)
    net.fn = failing(TorchDynamoException("a recompile failed later"))
    with pytest.raises(TorchDynamoException):
        net(x)
    off = runtime.Compiled(eager, False, "toy")
    assert off.settled and not off.can_fall_back(TorchDynamoException("x"))


def test_torchrun_batch_must_split_evenly(monkeypatch):
    """Under torchrun each process trains on its slice of the global batch: 3 images over 2
    processes would weight one process's images twice as much."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="batch size 3 is not a multiple of the 2 torchrun processes"):
        _toy_fit(0.1, n=12, epochs=1, batch_size=3)
