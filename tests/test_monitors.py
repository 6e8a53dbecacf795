"""Health signals: collapse monitors, grad norms, non-finite steps, throughput and data wait.

Fast tier: the statistics against their definitions and each on a hand-made collapse; the hooks;
the non-finite bookkeeping (skip, restore, deferred host check). Slow tier: real CIFAR-10 runs of
the loop, a healthy SimCLR that stays quiet and a forced collapse (constant projector) that fires.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from sslray.config import load_config
from sslray.raytrain.monitors import (
    EmbeddingTap,
    NonFiniteLossError,
    StepHealth,
    collapse_metrics,
    collapse_report,
    collapse_stats,
    tripped,
)


def host(stats):
    return {k: float(v) for k, v in stats.items()}


# --- collapse statistics ---------------------------------------------------------------------------

def test_stats_match_their_definitions_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    s = host(collapse_stats(x))
    u = torch.nn.functional.normalize(x, dim=1).numpy()
    assert s["std_ratio"] == pytest.approx(u.std(0, ddof=1).mean() * math.sqrt(64), rel=1e-4)
    sv = np.linalg.svd(x.numpy(), compute_uv=False)
    p = sv / sv.sum() + 1e-7
    assert s["rankme"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)
    cos = u @ u.T
    assert s["mean_cos"] == pytest.approx((cos.sum() - np.trace(cos)) / (256 * 255), abs=1e-5)
    # Healthy: std ~ 1/sqrt(d), rank near d, cosine near 0 -> nothing trips.
    assert 0.9 < s["std_ratio"] <= 1.01 and s["rankme"] > 50 and abs(s["mean_cos"]) < 0.05
    assert tripped(s) == []


def test_complete_collapse_trips_all_three():
    x = torch.ones(128, 32) + 1e-6 * torch.randn(128, 32)
    why = tripped(host(collapse_stats(x)))
    assert len(why) == 3 and "RankMe" in why[1] and "mean cosine" in why[2]


def test_dimensional_collapse_trips_rank_only():
    # Every embedding on one line through the origin, both signs: cosine averages ~0, the std of the
    # normalised rows is not small, but the batch spans one direction.
    g = torch.Generator().manual_seed(1)
    signs = torch.where(torch.rand(200, 1, generator=g) < 0.5, -1.0, 1.0)
    x = signs * torch.rand(200, 1, generator=g) * torch.randn(1, 48, generator=g)
    s = host(collapse_stats(x))
    assert s["rankme"] < 1.1
    assert [w.split()[0] for w in tripped(s)] == ["RankMe"]


def test_stats_need_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        collapse_stats(torch.randn(1, 8))


# --- the hooks -------------------------------------------------------------------------------------

def _simclr():
    cfg = load_config("smoke")
    from sslray.raytrain.methods import create_method

    torch.manual_seed(0)
    return create_method(cfg)


def test_tap_keeps_the_first_head_call_only_while_armed():
    model = _simclr()
    tap = EmbeddingTap(model)
    views = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)]
    model(views)
    assert tap.take() == {}  # not armed: nothing kept
    tap.armed = True
    model(views)
    first = {k: v.clone() for k, v in tap.captured.items()}
    model([v + 1 for v in views])  # a second call while armed does not overwrite
    got = tap.take()
    assert got["feats"].shape == (12, 512) and got["z"].shape == (12, 32)
    assert torch.equal(got["z"], first["z"]) and not got["z"].requires_grad
    assert tap.armed is False and tap.captured == {}
    tap.remove()


def test_constant_projector_output_fires_on_z_and_not_on_features():
    """The forced collapse of the issue: a projector whose output does not depend on its input."""
    model = _simclr()

    class Constant(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0 + 1.0

    model.projector = Constant(model.projector)
    tap = EmbeddingTap(model)
    tap.armed = True
    model([torch.rand(16, 3, 32, 32), torch.rand(16, 3, 32, 32)])
    m = {k: float(v) for k, v in collapse_metrics(tap.take()).items()}
    flags, lines = collapse_report(m)
    assert flags == {"collapse_feats": 0.0, "collapse_z": 1.0}
    assert len(lines) == 1 and lines[0].startswith("collapse warning: projector outputs")


# --- gradient norms and non-finite steps ------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 3)
        self.projector = nn.Linear(3, 2)

    def forward(self, x):
        return self.projector(self.backbone(x)).square().mean()


def _step(model, opt, health, step, poison=False):
    loss = model(torch.randn(8, 4))
    if poison:
        loss = loss * float("nan")
    opt.zero_grad()
    loss.backward()
    ok = health.after_backward(loss, step, lr=0.1)
    if health.due(step):
        health.check("tiny", 1)
    opt.step()
    health.restore(ok)
    return ok


def test_grad_norms_split_backbone_and_heads():
    torch.manual_seed(0)
    model = Tiny()
    health = StepHealth(model, torch.device("cpu"))
    loss = model(torch.randn(8, 4))
    loss.backward()
    health.after_backward(loss, 0)
    m = {k: float(v) for k, v in health.epoch_metrics(1).items()}
    bb = torch.cat([p.grad.flatten() for p in model.backbone.parameters()]).norm()
    hd = torch.cat([p.grad.flatten() for p in model.projector.parameters()]).norm()
    assert m["grad_norm_backbone"] == pytest.approx(float(bb), rel=1e-5)
    assert m["grad_norm_heads"] == pytest.approx(float(hd), rel=1e-5)
    assert m["nonfinite_skipped_frac"] == 0.0


def test_first_nonfinite_step_stops_the_run_by_default():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    health = StepHealth(model, torch.device("cpu"))
    _step(model, opt, health, 0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError, match=r"tiny: non-finite loss nan or gradient at step 1 \(epoch 1\); "
                                                 r"last finite loss .* at step 0, lr 0.1"):
        _step(model, opt, health, 1, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # raised before the update


def test_skipped_step_leaves_the_weights_and_later_steps_train():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    health = StepHealth(model, torch.device("cpu"), max_skips=2)
    _step(model, opt, health, 0)
    before = [p.detach().clone() for p in model.parameters()]
    ok = _step(model, opt, health, 1, poison=True)
    assert not bool(ok)
    # Momentum and weight decay would move the weights on a zero gradient: the step is undone.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    _step(model, opt, health, 2)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(health.epoch_metrics(3)["nonfinite_skipped_frac"]) == pytest.approx(1 / 3)
    # Three in a row is one more than allowed: the run stops, naming where the streak began.
    _step(model, opt, health, 3, poison=True)
    _step(model, opt, health, 4, poison=True)
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \(epoch 1\); 2 consecutive non-finite steps were skipped"):
        _step(model, opt, health, 5, poison=True)


class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.projector = nn.Linear(3, 2)

    def forward(self, x):
        return self.projector(self.backbone(x)).square().mean()


def test_a_skipped_step_whose_forward_went_nan_leaves_the_bn_statistics_too():
    """A NaN activation (not only a NaN loss) writes NaN into BN's running statistics during the
    forward; train-mode BN never reads them, eval mode (kNN, probe, export) does."""
    torch.manual_seed(0)
    model = TinyBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    health = StepHealth(model, torch.device("cpu"), max_skips=2)
    bn = model.backbone[1]
    for step, x in enumerate([torch.randn(8, 4), torch.full((8, 4), float("nan")), torch.randn(8, 4)]):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        health.before_forward()
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        ok = health.after_backward(loss, step, lr=0.1)
        opt.step()
        health.restore(ok)
        if step == 1:
            assert not bool(ok)
            after = model.state_dict()
            changed = [k for k in before
                       if not torch.equal(before[k], after[k]) and k != "backbone.1.num_batches_tracked"]
            assert changed == [], changed  # parameters and running statistics as they were
        else:
            assert bool(ok) and not torch.equal(before["backbone.1.running_mean"], bn.running_mean)
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()


def test_the_online_probe_learns_nothing_from_a_skipped_step():
    from sslray.raytrain.online_probe import OnlineProbe

    torch.manual_seed(0)
    probe = OnlineProbe(6, 3, nn.Identity(), torch.device("cpu"))
    y = torch.tensor([0, 1, 2, 0])
    probe.step_features(torch.randn(4, 6), y, torch.tensor(True))
    stats, sums = (probe.running_mean.clone(), probe.running_var.clone()), probe.sums.clone()
    # What a step that learnt nothing does: the optimizer steps on zero gradients (Adam's moments decay).
    nothing, learnt = copy.deepcopy(probe), copy.deepcopy(probe)
    for p in nothing.head.parameters():
        p.grad = torch.zeros_like(p)
    nothing.opt.step()
    learnt.step_features(torch.randn(4, 6), y, torch.tensor(True))
    probe.step_features(torch.full((4, 6), float("nan")), y, torch.tensor(False))
    assert all(torch.isfinite(v).all() for v in probe.head.state_dict().values())
    assert torch.equal(probe.running_mean, stats[0]) and torch.equal(probe.running_var, stats[1])
    assert torch.equal(probe.sums, sums)  # the skipped step is not in the epoch's probe accuracy
    got, want = probe.head.state_dict(), nothing.head.state_dict()
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-7) for k in want), "the head learnt from the step"
    assert any(not torch.allclose(got[k], v, rtol=0, atol=1e-5) for k, v in learnt.head.state_dict().items())
    probe.step_features(torch.randn(4, 6), y, torch.tensor(True))
    assert float(probe.sums[1]) == 8  # the next good step counts again


def test_gpu_style_deferred_check_waits_for_its_step_then_names_the_first_bad_one():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    health = StepHealth(model, torch.device("cpu"), max_skips=0, check_every=4)
    _step(model, opt, health, 0)
    _step(model, opt, health, 1, poison=True)  # not due: no host look, no raise
    _step(model, opt, health, 2)
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(epoch 1\)"):
        _step(model, opt, health, 3)  # (3 + 1) % 4 == 0: the host looks now


# --- the loop on real CIFAR-10 ---------------------------------------------------------------------

def _cfg(cifar_small, *extra):
    return load_config("smoke", [f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}",
                                 "ray.num_workers=1", "train.epochs=2", "train.max_steps_per_epoch=4",
                                 "data.knn_bank=256", "monitor.pictures=false", *extra])


@pytest.mark.slow
def test_healthy_simclr_stays_quiet_and_a_constant_projector_fires(cifar_small, monkeypatch, capsys):
    from sslray.raytrain.loop import run_local
    from sslray.raytrain.methods import simclr

    _, session = run_local(_cfg(cifar_small, "method.temperature=0.2"))
    out = capsys.readouterr().out
    assert [m["epoch"] for m in session.history] == [1, 2]
    for m in session.history:
        assert m["collapse_feats"] == 0.0 and m["collapse_z"] == 0.0, m
        assert m["z_rankme"] > 5 and m["z_std_ratio"] > 0.3 and m["z_mean_cos"] < 0.9
        assert 0 < m["grad_norm_backbone"] < 1e3 and 0 < m["grad_norm_heads"] < 1e3
        assert m["nonfinite_skipped_frac"] == 0.0
        assert m["data_wait_ms_per_step"] >= 0 and m["images_per_sec_per_worker"] == m["images_per_sec"] > 0
    assert "collapse warning" not in out

    class ConstantHead(simclr.MLPHead):
        def forward(self, x):
            return super().forward(x) * 0 + 1.0

    monkeypatch.setattr(simclr, "MLPHead", ConstantHead)
    _, collapsed = run_local(_cfg(cifar_small))
    out = capsys.readouterr().out
    assert all(m["collapse_z"] == 1.0 and m["z_rankme"] < 2 for m in collapsed.history)
    assert out.count("collapse warning: projector outputs") == 2  # once per epoch


@pytest.mark.slow
def test_a_skipped_non_finite_step_is_counted_and_the_run_goes_on(cifar_small, poison_loss):
    from sslray.raytrain.loop import run_local

    poison_loss(2)
    last, _ = run_local(_cfg(cifar_small, "train.epochs=1", "monitor.max_nonfinite_skips=1", "data.val="))
    assert last["step"] == 4 and math.isfinite(last["loss"])
    assert last["nonfinite_skipped_frac"] == pytest.approx(0.25)


@pytest.mark.slow
def test_a_nan_activation_skipped_in_the_real_loop_leaves_no_nan_in_the_checkpoint(cifar_small, tmp_path,
                                                                                   monkeypatch):
    """One transient non-finite activation inside the backbone at the 3rd training forward, with the
    kNN monitor and the online probe on: the step is skipped and nothing NaN reaches the checkpoint."""
    import glob

    import sslray.raytrain.loop as L

    real = L.create_method
    calls = {"n": 0}

    def create(cfg):
        model = real(cfg)

        def hook(mod, inp, out):
            if mod.training and torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == 3:
                    return out * float("nan")
            return None

        model.backbone.layer1.register_forward_hook(hook)
        return model

    monkeypatch.setattr(L, "create_method", create)
    last, _ = L.run_local(_cfg(cifar_small, "train.epochs=1", "train.max_steps_per_epoch=5",
                               "monitor.max_nonfinite_skips=1", "model.backbone=resnet18"), str(tmp_path))
    assert last["nonfinite_skipped_frac"] == pytest.approx(0.2)
    state = torch.load(glob.glob(f"{tmp_path}/epoch_0001/state.pt")[0], weights_only=False)
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert bad == [], bad[:4]
    assert all(torch.isfinite(v).all() for v in state["online_probe"]["head"].values())
    assert math.isfinite(last["online_probe_train_loss"]) and last["knn_top1"] > 0


@pytest.mark.gpu
def test_per_step_bookkeeping_never_syncs_the_host_on_cuda():
    """The reason the check is deferred: after_backward/restore/due run every step and must queue
    device work only. torch's sync debug mode turns any host sync inside them into an error."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    for max_skips in (0, 2):
        model = TinyBN().to(dev)  # BN: running statistics are kept and put back as well
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        health = StepHealth(model, dev, max_skips=max_skips, check_every=50)
        for step in range(4):
            torch.cuda.set_sync_debug_mode("error")
            try:
                health.before_forward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            loss = model(torch.randn(8, 4, device=dev)) * (float("nan") if step == 2 else 1.0)
            opt.zero_grad()
            loss.backward()
            torch.cuda.set_sync_debug_mode("error")
            try:
                ok = health.after_backward(loss, step, lr=0.1)
                assert not health.due(step)
                opt.step()
                health.restore(ok)
                sums = health.epoch_metrics(step + 1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # max_skips=0 does not mask: the bad step poisons the weights, so every later step is bad too
        # until the host looks (and stops the run, naming the first); with skips the run recovers.
        assert float(sums["nonfinite_skipped_frac"]) == pytest.approx(0.5 if max_skips == 0 else 0.25)
        if max_skips == 0:
            with pytest.raises(NonFiniteLossError, match=r"at step 2 \(epoch 1\)"):
                health.check("tiny", 1)
        else:
            health.check("tiny", 1)  # one skipped step is within the limit
            assert all(torch.isfinite(p).all() for p in model.parameters())
    x = torch.randn(64, 16, device=dev)
    assert tripped({k: float(v) for k, v in collapse_stats(x).items()}) == []
