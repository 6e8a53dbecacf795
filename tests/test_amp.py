"""Mixed precision: which dtype ``train.precision`` means on a device, and fp16 loss scaling in the
step (an overflow is the scaler's to skip, not a fault; its state survives a resume)."""

from __future__ import annotations

import math

import pytest
import torch

from sslray.config import ConfigError, load_config
from sslray.raytrain.amp import autocast_for, grad_scaler, resolve_precision
from sslray.raytrain.monitors import OVERFLOW_STREAK_MAX, NonFiniteLossError, StepHealth


CPU = torch.device("cpu")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(4, 3)
        self.projector = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.projector(self.backbone(x)).square().mean()


@pytest.mark.parametrize("capability, want", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_follows_the_gpu_generation(monkeypatch, capability, want):
    """bf16 where the GPU computes it natively (sm80+), fp16 with loss scaling before (V100, T4)."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == want
    assert resolve_precision("fp32", cuda) == "fp32" and resolve_precision("bf16", cuda) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"
    assert grad_scaler(CPU, "fp16").is_enabled() and not grad_scaler(CPU, "bf16").is_enabled()
    assert not grad_scaler(CPU, "auto").is_enabled()


def test_doctor_says_which_precision_auto_picks(monkeypatch):
    from sslray.doctor import check_gpu

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    gpu = next(c for c in check_gpu(True) if c.name == "gpu")
    assert gpu.status == "OK" and gpu.detail.endswith("train.precision=auto trains in fp16 with loss scaling"), gpu


def test_autocast_dtype_per_precision():
    x = torch.randn(4, 4)
    for prec, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32),
                        ("auto", torch.float32)):
        with autocast_for(CPU, prec):
            assert (x @ x).dtype == dtype, prec


def test_an_unknown_precision_is_refused_by_its_key():
    with pytest.raises(ConfigError, match=r"config key 'train.precision': expected one of auto, bf16, fp16, fp32, "
                                          r"got 'fp8'"):
        load_config("smoke", ["train.precision=fp8"])
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("half", CPU)


def _scaled_step(model, opt, scaler, health, step, x, fp16=True, grad_hook=None):
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        loss = model(x)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    ok = health.after_backward(loss, step, lr=0.1)
    health.check("tiny", 1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    health.restore(ok)
    return not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fp16_overflow_is_skipped_by_the_scaler_and_is_no_fault():
    """A real fp16 overflow (scale 2**30): the scaler skips those updates and halves its scale until the
    gradients fit; health counts them as overflows, not as non-finite faults, and the run goes on."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    health = StepHealth(model, CPU, loss_scaling=True)
    x = torch.randn(8, 4) * 30
    moved = [_scaled_step(model, opt, scaler, health, s, x) for s in range(24)]
    k = moved.index(True)  # the first update the scaler let through
    assert 0 < k < 24 and all(moved[k:]), moved
    assert scaler.get_scale() == 2.0**30 / 2**k  # halved once per overflow, no growth within 2,000 steps
    m = {key: float(v) for key, v in health.epoch_metrics(24).items()}
    assert m["amp_overflow_frac"] == pytest.approx(k / 24)
    assert m["nonfinite_skipped_frac"] == 0.0
    assert math.isfinite(m["grad_norm_backbone"]) and m["grad_norm_backbone"] > 0  # over the finite steps only
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # Without loss scaling the same non-finite gradient is a fault: the first one stops the run.
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* or gradient at step 0"):
        _scaled_step(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**30),
                     StepHealth(model, CPU, loss_scaling=False), 0, x)


def test_gradients_that_stay_non_finite_under_fp16_stop_the_run_naming_fp16():
    """Not an overflow the scale can cure: a gradient that is inf at every scale. After more than
    OVERFLOW_STREAK_MAX skipped steps in a row the run stops, naming fp16 and what to use instead."""
    torch.manual_seed(0)
    model = Tiny()
    model.backbone.weight.register_hook(lambda g: g * float("inf"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    health = StepHealth(model, CPU, loss_scaling=True)
    x = torch.randn(8, 4)
    for s in range(OVERFLOW_STREAK_MAX):
        assert not _scaled_step(model, opt, scaler, health, s, x, fp16=False)
    with pytest.raises(NonFiniteLossError, match=rf"tiny: fp16: gradients non-finite for more than "
                                                 rf"{OVERFLOW_STREAK_MAX} steps in a row, up to step "
                                                 rf"{OVERFLOW_STREAK_MAX} .*train.precision=bf16"):
        _scaled_step(model, opt, scaler, health, OVERFLOW_STREAK_MAX, x, fp16=False)


def test_a_nan_loss_under_fp16_stops_at_once():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    health = StepHealth(model, CPU, loss_scaling=True)
    scaler = torch.amp.GradScaler("cpu")
    _scaled_step(model, opt, scaler, health, 0, torch.randn(8, 4))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan or gradient at step 1"):
        _scaled_step(model, opt, scaler, health, 1, torch.randn(8, 4) * float("nan"))


# --- the loop on real CIFAR-10 (CPU fp16 autocast: slow per step, so tiny settings) ---------------

def _fp16_cfg(cifar_small, *extra):
    return load_config("smoke", [f"data.train={cifar_small['train']}", "data.val=", "ray.num_workers=1",
                                 "train.precision=fp16", "model.backbone=resnet10t", "data.batch_size=8",
                                 "train.max_steps_per_epoch=2", "monitor.collapse=false", *extra])


@pytest.mark.slow
def test_fp16_run_keeps_its_loss_scale_across_a_resume(cifar_small, tmp_path):
    """fp16 on real CIFAR-10: the epoch logs its loss scale; 1 epoch + resume equals 2 epochs straight,
    the scaler's state included (a resumed run that restarted the scale at 2**16 would differ)."""
    from sslray.raytrain.loop import run_local
    from sslray.raytrain.session import load_state

    torch.set_num_threads(2)
    cfg = _fp16_cfg(cifar_small, "train.epochs=2")
    straight, s = run_local(cfg, str(tmp_path / "a"))
    assert [m["epoch"] for m in s.history] == [1, 2]
    assert all(math.isfinite(m["loss"]) and m["nonfinite_skipped_frac"] == 0 for m in s.history)
    assert all("amp_scale" in m and m["amp_overflow_frac"] < 1 and m["grad_norm_backbone"] > 0 for m in s.history)

    run_local(cfg.replace(**{"train.epochs": 1}), str(tmp_path / "b"))
    resumed, _ = run_local(cfg, str(tmp_path / "b"))
    assert resumed["loss"] == straight["loss"] and resumed["amp_scale"] == straight["amp_scale"]
    sa, sb = (load_state(tmp_path / d / "epoch_0002", CPU) for d in ("a", "b"))
    assert sa["grad_scaler"]["scale"] == straight["amp_scale"] and sa["grad_scaler"] == sb["grad_scaler"]
    assert all(torch.equal(v, sb["model"][k]) for k, v in sa["model"].items())

    run_local(cfg.replace(**{"train.precision": "fp32", "train.epochs": 1}), str(tmp_path / "c"))
    assert load_state(tmp_path / "c" / "epoch_0001", CPU)["grad_scaler"] is None  # no scaler without fp16


@pytest.mark.slow
def test_fp16_loop_rides_out_real_overflows(cifar_small, monkeypatch):
    """The loop started at a loss scale too large for fp16 (2**19): the first steps overflow and
    are skipped by the scaler, the scale halves once per overflow, and the run trains on without a
    non-finite fault (before loss scaling was wired in, the first overflow stopped the run)."""
    from sslray.raytrain import loop

    init = 2.0**19
    monkeypatch.setattr(loop, "grad_scaler", lambda dev, prec: torch.amp.GradScaler(dev.type, init_scale=init))
    torch.set_num_threads(2)
    last, s = loop.run_local(_fp16_cfg(cifar_small, "train.epochs=1", "train.max_steps_per_epoch=6"))
    overflows = round(last["amp_overflow_frac"] * 6)
    assert 0 < overflows < 6, last
    assert last["amp_scale"] == init / 2**overflows
    assert last["nonfinite_skipped_frac"] == 0 and math.isfinite(last["loss"])
    assert last["grad_norm_backbone"] > 0  # the steps after the overflows updated the weights


@pytest.mark.gpu
def test_fp16_and_bf16_steps_train_on_cuda(cifar_small):
    """Both half precisions through the loop on a GPU: finite losses; fp16 reports its scale."""
    from sslray.raytrain.loop import run_local

    for prec in ("fp16", "bf16"):
        cfg = load_config("smoke", [f"data.train={cifar_small['train']}", "data.val=", "ray.num_workers=1",
                                    "ray.use_gpu=true", f"train.precision={prec}", "train.epochs=1"])
        last, _ = run_local(cfg)
        assert math.isfinite(last["loss"]) and last["nonfinite_skipped_frac"] == 0, (prec, last)
        assert ("amp_scale" in last) == (prec == "fp16")
