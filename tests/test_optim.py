"""Optimizers and schedules: LARS leaves biases and norm parameters out of adaptation and decay,
warm-up cosine lr and cosine EMA momentum hit their end points."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sslray.raytrain.optim import LARS, build_optimizer, cosine_momentum, param_groups, warmup_cosine


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def test_bias_and_norm_parameters_get_no_decay_and_no_lars():
    m = _model()
    decay, no_decay = param_groups(m, 1e-4)
    names = {id(p): n for n, p in m.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "2.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "1.weight", "2.bias"]
    assert decay["lars"] and decay["weight_decay"] == 1e-4
    assert not no_decay["lars"] and no_decay["weight_decay"] == 0.0


def test_lars_step_matches_the_formula():
    m = _model()
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    lr, wd, eta = 0.5, 1e-2, 0.001
    opt = LARS(param_groups(m, wd), lr=lr, momentum=0.9, eta=eta)
    opt.step()
    params = dict(m.named_parameters())
    d = g["0.weight"] + wd * w0["0.weight"]  # a weight: decayed, then scaled by the trust ratio
    trust = eta * w0["0.weight"].norm() / d.norm()
    torch.testing.assert_close(params["0.weight"], w0["0.weight"] - lr * trust * d)
    for n in ("0.bias", "1.weight", "1.bias"):  # plain SGD: no decay, no adaptation
        torch.testing.assert_close(params[n], w0[n] - lr * g[n])


def _lars_reference(params_and_groups, state, eta=0.001, clip=False):
    """The per-tensor LARS update, written out one parameter at a time; ``clip``: the capped variant the
    CIFAR reproductions use (solo-learn's LARS: adapted lr eta*|w|/(|g|+wd*|w|), divided by the lr and
    capped at 1, multiplies the decayed gradient)."""
    for g in params_and_groups:
        for p in g["params"]:
            if p.grad is None:
                continue
            if g["lars"] and clip:  # solo-learn's LARS step (clip_lr, exclude_bias_n_norm), line by line
                d = p.grad
                pn, gn = p.norm(), p.grad.norm()
                if pn != 0 and gn != 0:
                    lars_lr = eta * pn / (gn + pn * g["weight_decay"] + 1e-8)
                    lars_lr = min(float(lars_lr / g["lr"]), 1.0) if g["lr"] > 0 else 1.0
                    d = (d + g["weight_decay"] * p) * lars_lr
                buf = state.get(p)
                state[p] = d.clone() if buf is None else buf * g["momentum"] + d
                p.sub_(g["lr"] * state[p])
                continue
            d = p.grad + g["weight_decay"] * p if g["weight_decay"] else p.grad
            if g["lars"]:
                pn, dn = p.norm(), d.norm()
                d = d * (eta * pn / dn if pn > 0 and dn > 0 else 1.0)
            buf = state.get(p)
            state[p] = d.clone() if buf is None else buf * g["momentum"] + d
            p.sub_(g["lr"] * state[p])


@pytest.mark.parametrize("eta,clip", [(0.001, False), (0.02, True), (2.0, True)],
                         ids=["official", "capped", "capped-binding"])
def test_lars_matches_a_per_tensor_reference_over_steps(eta, clip):
    """The batched (foreach) step equals the per-tensor formula over several momentum steps, with a
    zero weight (trust ratio 1), a parameter without a gradient (skipped) and lr changes between steps;
    for the capped variant too, where the cap binds (eta 2) and where it does not (eta 0.02)."""
    torch.manual_seed(0)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a[0].weight[0].zero_(), b[0].weight[0].zero_()
        a[2].weight.zero_(), b[2].weight.zero_()  # a whole zero weight: ||w|| = 0 -> trust 1
    opt = LARS(param_groups(a, 1e-2), lr=0.5, momentum=0.9, eta=eta, clip=clip)
    ref_groups = [dict(g, momentum=0.9) for g in param_groups(b, 1e-2)]
    state = {}
    for step in range(5):
        lr = 0.5 * (1 - step / 10) if step else 0.0  # the first warm-up step has lr 0
        for g in opt.param_groups:
            g["lr"] = lr
        for g in ref_groups:
            g["lr"] = lr
        grads = [torch.randn_like(p) for p in a.parameters()]
        if step == 3:
            grads[0].zero_()  # a zero gradient (not a missing one): the capped variant neither adapts nor decays
        for pa, pb, gr in zip(a.parameters(), b.parameters(), grads):
            skip = step == 2 and pa is a[1].bias
            pa.grad = None if skip else gr.clone()
            pb.grad = None if skip else gr.clone()
        opt.step()
        with torch.no_grad():
            _lars_reference(ref_groups, state, eta=eta, clip=clip)
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, msg=f"step {step}: {n}")


def test_capped_lars_moves_weights_at_the_rate_its_lr_was_tuned_for():
    """The CIFAR recipes' lr and weight decay come with the capped LARS at eta 0.02; the uncapped
    eta-0.001 step is ~20x smaller for the same lr (the review measured 17-20x on a ResNet-18)."""
    torch.manual_seed(0)
    steps = {}
    for eta, clip in ((0.001, False), (0.02, True)):
        m = _model()
        torch.manual_seed(1)
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 0.01
        w0 = m[0].weight.detach().clone()
        LARS(param_groups(m, 1e-5), lr=1.0, momentum=0.9, eta=eta, clip=clip).step()
        steps[clip] = (m[0].weight.detach() - w0).norm() / w0.norm()
    assert 15 < steps[True] / steps[False] < 25, steps


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_build_optimizer_keeps_the_groups(name):
    opt = build_optimizer(_model(), name, lr=0.1, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(_model(), "rmsprop", lr=0.1, weight_decay=0.0)


def test_warmup_cosine_end_points():
    peak, floor, total, warm = 1.0, 0.01, 100, 10
    lrs = [warmup_cosine(s, total, warm, peak, floor) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[warm - 1] == pytest.approx(peak)
    assert lrs[warm] == pytest.approx(peak) and lrs[total] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :])), "not decreasing after warm-up"
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(floor + (peak - floor) / 2)


def test_cosine_momentum_goes_from_base_to_one():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)


def test_weight_decay_schedule_end_points_and_group_scales():
    from torch import nn

    from sslray.raytrain.optim import build_optimizer, set_weight_decay, weight_decay_at

    assert weight_decay_at(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert weight_decay_at(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert weight_decay_at(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    mids = [weight_decay_at(s, 100, 0.04, 0.4) for s in range(101)]
    assert all(a <= b for a, b in zip(mids, mids[1:]))  # rises monotonically
    assert weight_decay_at(70, 100, 0.05, -1.0) == 0.05  # end < 0: constant
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    for name in ("sgd", "lars", "adamw"):
        opt = build_optimizer(model, name, 0.1, 0.04)
        set_weight_decay(opt, 0.3)
        decays = sorted(g["weight_decay"] for g in opt.param_groups)
        assert decays == [0.0, 0.3], name  # biases and norm parameters stay undecayed


def test_loop_applies_the_weight_decay_schedule(monkeypatch):
    """The loop sets each step's decay from optim.weight_decay_end, rising along the cosine."""
    from sslray.config import load_config
    from sslray.datasets.resident import ResidentDataset, ResidentLoader
    from sslray.raytrain import loop as L
    from sslray.raytrain.session import LocalSession

    assert load_config("dino_imagenet").optim.weight_decay_end == 0.4  # DINO's recipe uses it
    seen = []
    real = L.set_weight_decay
    monkeypatch.setattr(L, "set_weight_decay", lambda opt, wd: (seen.append(wd), real(opt, wd)))
    g = torch.Generator().manual_seed(0)
    ds = ResidentDataset(torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g),
                         torch.arange(32) % 4, ["a", "b", "c", "d"])
    monkeypatch.setattr(L, "build_data", lambda cfg, session: L.Data(
        ResidentLoader(ds, 8, train=True), None, None, 4, 4))
    cfg = load_config("smoke", ["ray.num_workers=1", "data.batch_size=8", "train.epochs=2",
                                "optim.weight_decay=0.01", "optim.weight_decay_end=0.1", "train.online_probe=false"])
    L.train_loop(cfg, LocalSession(None))
    assert len(seen) == 8 and seen[0] == pytest.approx(0.01)
    assert all(a < b for a, b in zip(seen, seen[1:])) and seen[-1] < 0.1


def test_simsiam_predictor_keeps_a_fixed_lr():
    from sslray.config import load_config
    from sslray.raytrain.methods import create_method
    from sslray.raytrain.optim import build_optimizer, set_lr

    over = ["model.backbone=resnet18", "model.proj_hidden_dim=32", "model.proj_out_dim=16", "method.params.pred_hidden_dim=8"]
    model = create_method(load_config("simsiam_cifar10", over))
    pred = {id(p) for p in model.predictor.parameters()}
    for name in ("sgd", "lars", "adamw"):
        opt = build_optimizer(model, name, 0.06, 5e-4)
        set_lr(opt, 0.001)
        for g in opt.param_groups:
            ids = {id(p) for p in g["params"]}
            assert g["lr"] == (0.06 if ids <= pred else 0.001), name
            assert ids <= pred or not ids & pred  # a group is all predictor or none of it
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    off = create_method(load_config("simsiam_cifar10", over + ["method.params.fix_pred_lr=false"]))
    opt = build_optimizer(off, "sgd", 0.06, 5e-4)
    set_lr(opt, 0.001)
    assert all(g["lr"] == 0.001 for g in opt.param_groups)


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_a_resume_keeps_the_checkpoints_moments_and_this_runs_group_settings(name):
    """Resumed at half the batch (the peak lr halves) with another weight decay: SimSiam's fixed
    predictor lr and the decay are this run's, the momentum buffers the checkpoint's."""
    from sslray.config import load_config
    from sslray.raytrain.methods import create_method
    from sslray.raytrain.optim import build_optimizer, load_optimizer_state, set_lr

    over = ["model.backbone=resnet18", "model.proj_hidden_dim=32", "model.proj_out_dim=16",
            "method.params.pred_hidden_dim=8"]
    torch.manual_seed(0)
    model = create_method(load_config("simsiam_cifar10", over))
    old = build_optimizer(model, name, 0.06, 5e-4)
    model([torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)])["loss"].backward()
    old.step()
    saved = old.state_dict()

    new = build_optimizer(model, name, 0.03, 1e-4)
    load_optimizer_state(new, saved)
    set_lr(new, 0.001)
    fixed = [g for g in new.param_groups if "fixed_lr" in g]
    assert fixed and all(g["lr"] == g["fixed_lr"] == 0.03 * g["lr_scale"] for g in fixed)
    assert {g["weight_decay"] for g in new.param_groups} == {1e-4, 0.0}
    moments = new.state_dict()["state"]
    assert moments.keys() == saved["state"].keys() and moments
    for i, st in moments.items():
        assert st.keys() == saved["state"][i].keys()
        assert all(torch.equal(v, saved["state"][i][k]) for k, v in st.items() if torch.is_tensor(v))


def test_biases_and_norms_can_run_at_a_scaled_lr():
    from sslray.config import load_config
    from sslray.raytrain.optim import build_optimizer, set_lr

    assert load_config("barlowtwins_imagenet").optim.no_decay_lr_scale == 0.024
    model = _model()
    opt = build_optimizer(model, "lars", 0.2, 1e-6, no_decay_lr_scale=0.024)
    set_lr(opt, 0.1)
    by_decay = {g["weight_decay"] > 0: g["lr"] for g in opt.param_groups}
    assert by_decay[True] == pytest.approx(0.1) and by_decay[False] == pytest.approx(0.0024)


@pytest.mark.gpu
@pytest.mark.parametrize("clip", [False, True])
def test_lars_step_never_syncs_the_host_on_cuda(clip):
    dev = torch.device("cuda")
    m = _model().to(dev)
    opt = LARS(param_groups(m, 1e-4), lr=0.1, momentum=0.9, eta=0.02 if clip else 0.001, clip=clip)
    for step in range(2):  # the first step creates the momentum buffers, the second updates them
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_the_config_reaches_the_optimizer():
    """optim.lars_eta / lars_clip / adam_beta1-2 are what the loop's optimizer gets; MAE's recipe keeps
    its paper betas (0.9, 0.95), DINO and MoCo v3 get torch's defaults as their papers' code."""
    from sslray.config import load_config
    from sslray.raytrain.optim import optimizer_from_config

    cfg = load_config("byol_cifar10")
    opt = optimizer_from_config(_model(), cfg, 0.1)
    assert isinstance(opt, LARS) and all(g["eta"] == 0.02 and g["clip"] for g in opt.param_groups)
    opt = optimizer_from_config(_model(), cfg.replace(**{"optim.lars_eta": 0.001, "optim.lars_clip": False}), 0.1)
    assert all(g["eta"] == 0.001 and not g["clip"] for g in opt.param_groups)
    betas = {r: optimizer_from_config(_model(), load_config(r), 0.1).param_groups[0]["betas"]
             for r in ("mae_cifar10", "mae_imagenet", "dino_imagenet", "mocov3_imagenet")}
    assert betas == {"mae_cifar10": (0.9, 0.95), "mae_imagenet": (0.9, 0.95),
                     "dino_imagenet": (0.9, 0.999), "mocov3_imagenet": (0.9, 0.999)}


def test_every_cifar_lars_recipe_uses_the_lars_its_lr_was_tuned_for():
    """Each CIFAR LARS recipe takes a reproduction's lr and weight decay: eta 0.02 with the cap."""
    from sslray.config import CONFIG_DIR, load_config

    lars = [p.stem for p in sorted(CONFIG_DIR.glob("*_cifar10.yaml")) if load_config(p.stem).optim.name == "lars"]
    assert len(lars) == 8, lars
    for r in lars:
        o = load_config(r).optim
        assert (o.lars_eta, o.lars_clip) == (0.02, True), r


@pytest.mark.parametrize("mode", ["global", "per_param"])
def test_gradient_clipping_modes(mode):
    """global: one norm over all gradients (torch's clip_grad_norm_); per_param: each tensor on its own
    (DINO), so a small gradient is left alone while a large one is scaled to the limit."""
    from sslray.raytrain.optim import clip_gradients

    m = _model()
    for p, scale in zip(m.parameters(), (100.0, 0.01, 1.0, 0.01, 50.0, 0.5), strict=True):
        p.grad = torch.full_like(p, scale)
    before = [p.grad.clone() for p in m.parameters()]
    clip_gradients(list(m.parameters()), 3.0, mode)
    after = [p.grad for p in m.parameters()]
    if mode == "global":
        total = torch.stack([g.norm() for g in before]).norm()
        for b, a in zip(before, after):
            torch.testing.assert_close(a, b * 3.0 / (total + 1e-6))
    else:
        for b, a in zip(before, after):
            expect = b * 3.0 / (b.norm() + 1e-6) if b.norm() > 3.0 else b
            torch.testing.assert_close(a, expect)
        assert after[1].norm() == before[1].norm()  # untouched
    with pytest.raises(Exception, match="optim.clip_mode"):
        from sslray.config import load_config
        load_config("smoke", ["optim.clip_mode=layer"])


def test_decay_bias_norm_decays_every_parameter_and_still_adapts_only_weights():
    """SimSiam's and MoCo's code put weight decay on every parameter: optim.decay_bias_norm does,
    while LARS adaptation and the no-decay lr scale stay with the weights / biases and norms."""
    groups = param_groups(_model(), 0.05, decay_bias_norm=True, no_decay_lr_scale=0.5)
    assert [(g["weight_decay"], g["lars"], g["lr_scale"]) for g in groups] == [(0.05, True, 1.0), (0.05, False, 0.5)]
    assert [(g["weight_decay"], g["lars"]) for g in param_groups(_model(), 0.05)] == [(0.05, True), (0.0, False)]
    from sslray.config import load_config

    for recipe, want in (("simsiam_cifar10", True), ("mocov2_imagenet", True), ("mocov3_imagenet", True),
                         ("byol_cifar10", False), ("simclr_cifar10", False)):
        assert load_config(recipe).optim.decay_bias_norm is want, recipe
