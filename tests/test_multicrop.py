"""Multi-crop (Caron et al. 2020) for BYOL, VICReg and Barlow Twins: with the two global views alone each
is bit for bit the two-view method it was; with local crops the losses equal their pairwise formulas,
the local crops train the backbone, BYOL's target never sees them, and the global crops are
interchangeable. The shared method tests (test_methods.py) run these methods with 2 local crops too."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from sslray.config import ConfigError, ViewConfig, load_config
from sslray.datasets.views import build_views
from sslray.raytrain.losses import (
    barlow_twins_loss,
    covariance_loss,
    invariance_loss,
    multicrop_barlow_twins_loss,
    multicrop_cosine_loss,
    multicrop_pairs,
    multicrop_vicreg_loss,
    negative_cosine_similarity,
    variance_loss,
    vicreg_loss,
)
from sslray.raytrain.losses.non_contrastive import _multicrop_vicreg
from sslray.raytrain.methods import check_method_config, multicrop_methods

import test_methods as T

NEW = ("byol", "vicreg", "barlowtwins")
pytestmark = pytest.mark.usefixtures("one_thread")


def _zs(n_views: int, seed: int = 0, n: int = 12, d: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    return [base + 0.5 * torch.randn(n, d, generator=g) for _ in range(n_views)]


def _same_grads(got, ref, inputs) -> bool:
    return all(torch.equal(x, y) for x, y in zip(torch.autograd.grad(got, inputs, retain_graph=True),
                                                  torch.autograd.grad(ref, inputs, retain_graph=True)))


# --- losses -------------------------------------------------------------------------------------------


def test_pairs_are_each_global_crop_with_every_later_view():
    assert multicrop_pairs(2) == [(0, 1)]
    assert multicrop_pairs(5) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    with pytest.raises(ValueError, match="at least 2 views"):
        multicrop_pairs(1)


def test_two_views_are_the_two_view_losses_bit_for_bit():
    """The multi-crop losses on 2 views: the very numbers (and gradients) of the two-view formulas."""
    a, b = (z.requires_grad_() for z in _zs(2))
    for multi, two in ((multicrop_vicreg_loss, vicreg_loss), (multicrop_barlow_twins_loss, barlow_twins_loss)):
        got, ref = multi([a, b]), two(a, b)
        assert torch.equal(got, ref)
        assert _same_grads(got, ref, [a, b])
    # BYOL's pre-multi-crop formula, (ncs(p1, t2) + ncs(p2, t1)) / 2, against the general pairing
    p1, p2, t1, t2 = _zs(4, seed=1)
    p1.requires_grad_(), p2.requires_grad_()
    got = multicrop_cosine_loss([p1, p2], [t1, t2])
    ref = (negative_cosine_similarity(p1, t2) + negative_cosine_similarity(p2, t1)) / 2
    assert torch.equal(got, ref)
    assert _same_grads(got, ref, [p1, p2])


def test_the_general_vicreg_on_two_views_is_the_two_view_formula():
    """The multi-view path (taken from 3 views on) reduces to eq. 6 on 2 views: its per-view averages
    keep the two-view scale (variance averaged, covariance summed)."""
    a, b = _zs(2, seed=2)
    torch.testing.assert_close(_multicrop_vicreg([a, b], 2, 25.0, 25.0, 1.0), vicreg_loss(a, b))
    torch.testing.assert_close(_multicrop_vicreg([a, b], 2, 2.0, 3.0, 0.5),
                               vicreg_loss(a, b, sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5))


def test_multicrop_losses_equal_their_pairwise_formulas():
    """Written out: 2 global crops (0, 1) and 3 local ones; each local crop meets each global crop,
    the global crops meet each other, local crops never meet; BYOL pairs every crop's prediction with
    the target of each other global crop."""
    zs = _zs(5, seed=3)
    pairs = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    bt = sum(barlow_twins_loss(zs[i], zs[j], lambda_=0.1) for i, j in pairs) / 7
    torch.testing.assert_close(multicrop_barlow_twins_loss(zs, lambda_=0.1), bt)
    vic = (25 * sum(invariance_loss(zs[i], zs[j]) for i, j in pairs) / 7
           + 25 * sum(variance_loss(z) for z in zs) / 5 + 1 * 2 * sum(covariance_loss(z) for z in zs) / 5)
    torch.testing.assert_close(multicrop_vicreg_loss(zs), vic)
    ps, ts = zs, _zs(2, seed=4)

    def cos(p, t):
        return -F.cosine_similarity(p, t, dim=1).mean()
    byol = (cos(ps[0], ts[1]) + cos(ps[1], ts[0]) + sum(cos(ps[i], ts[j]) for i in (2, 3, 4) for j in (0, 1))) / 8
    torch.testing.assert_close(multicrop_cosine_loss(ps, ts), byol)
    # a local crop paired with another local crop would change the number
    assert not torch.isclose(multicrop_barlow_twins_loss(zs, lambda_=0.1),
                             (bt * 7 + barlow_twins_loss(zs[2], zs[3], lambda_=0.1)) / 8)


@pytest.mark.parametrize("call", [
    lambda: multicrop_vicreg_loss([torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2)]),
    lambda: multicrop_barlow_twins_loss([torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 3)]),
    lambda: multicrop_vicreg_loss([torch.randn(4, 3)]),
    lambda: multicrop_cosine_loss([torch.randn(4, 3)], [torch.randn(4, 3)]),
])
def test_bad_views_raise_clear_errors(call):
    with pytest.raises(ValueError, match=r"expected|need"):
        call()


# --- methods ------------------------------------------------------------------------------------------


def _pre_multicrop_step(model, views, name):
    """The two-view forward as it was before multi-crop, on the model's own parts."""
    x1, x2 = views
    n = x1.shape[0]
    if name == "byol":
        x = torch.cat([x1, x2])
        p = model.predictor(model.projector(model.backbone(x)))
        t = model.target(x)
        loss = (negative_cosine_similarity(p[:n], t[n:]) + negative_cosine_similarity(p[n:], t[:n])) / 2
        return 4 + 4 * loss
    z = model.projector(model.backbone(torch.cat([x1, x2])))
    two_view = model.loss.keywords  # the builder's coefficients
    fn = vicreg_loss if name == "vicreg" else barlow_twins_loss
    return fn(z[:n], z[n:], **two_view)


def _loss_and_grads(model, views, step=None):
    torch.manual_seed(0)
    loss = step(model, views) if step else model(views)["loss"]
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("name", NEW)
def test_two_global_views_train_bit_for_bit_as_before(name):
    """views.local_crops=0: the loss and every gradient are those of the pre-multi-crop forward."""
    views = T.fixed_views(name)[:2]
    model = T.build(name)
    got_loss, got = _loss_and_grads(model, views)
    ref_loss, ref = _loss_and_grads(copy.deepcopy(T._fresh(name)), views,
                                    lambda m, v: _pre_multicrop_step(m, v, name))
    assert torch.equal(got_loss, ref_loss), (got_loss, ref_loss)
    assert len(got) == len(ref) and all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, ref))


@pytest.mark.parametrize("name", NEW)
def test_local_crops_reach_the_backbone_and_byols_target_sees_only_the_globals(name):
    model = T.build(name)
    views = [v.clone().requires_grad_() for v in T.fixed_views(name)]
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]
    online, target = [], []
    model.backbone.register_forward_pre_hook(lambda m, i: online.append(tuple(i[0].shape)))
    if name == "byol":
        model.target.module.register_forward_pre_hook(lambda m, i: target.append(tuple(i[0].shape)))
    loss = model(views)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    b = T.BATCH
    assert online == [(2 * b, 3, 32, 32), (2 * b, 3, 16, 16)]  # one backbone pass per crop size
    assert target == ([(2 * b, 3, 32, 32)] if name == "byol" else [])
    for i, v in enumerate(views):  # every crop, local ones included, sends gradients through the backbone
        assert v.grad is not None and float(v.grad.abs().sum()) > 0, f"{name}: view {i} has no gradient"


@pytest.mark.parametrize("name", NEW)
def test_swapping_the_global_crops_keeps_the_loss(name):
    model = T.build(name)
    views = T.fixed_views(name)
    swapped = [views[1], views[0], *views[2:]]
    torch.testing.assert_close(model(swapped)["loss"], model(views)["loss"], rtol=1e-5, atol=1e-6)
    # the local crops count: a loss that ignored them would not move when they change
    other = T._make_views(name, 1)
    assert not torch.isclose(model([*views[:2], *other[2:]])["loss"], model(views)["loss"], rtol=1e-4)


def test_the_methods_that_take_local_crops_are_the_shared_tests_multicrop_ones():
    assert set(multicrop_methods()) == set(T.MULTICROP_METHODS) == {"dino", "swav", "simclr", *NEW}


# --- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_local_crops_are_accepted_from_the_recipe(name):
    cfg = load_config(f"{name}_cifar10", {"views.local_crops": 3})
    check_method_config(cfg)
    assert cfg.views.preset == "byol"
    mv = build_views(cfg.views)
    assert mv.counts[-1] == 3 and sum(mv.counts) == 5
    local = mv.augs[-1].params
    assert (local.size, local.scale, local.solarize_p) == (16, (0.05, 0.14), 0.0)
    imgs = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    views = mv(imgs)
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert not torch.equal(views[2], views[3])  # each local crop draws its own crop
    sized = build_views(ViewConfig(preset="byol", crop_size=64, local_crops=2, local_size=24))
    assert [a.params.size for a, c in zip(sized.augs, sized.counts) for _ in range(c)] == [64, 64, 24, 24]
    assert sum(build_views(ViewConfig(preset="byol")).counts) == 2  # two views unless asked


@pytest.mark.parametrize("name", ["nnclr", "mocov3", "simsiam", "mocov2"])
def test_methods_without_local_crops_refuse_them_by_key(name):
    cfg = load_config(f"{name}_cifar10", {"views.local_crops": 2})
    with pytest.raises(ConfigError, match=r"views\.local_crops.*" + name):
        check_method_config(cfg)


def test_a_presets_default_local_crops_are_refused_for_a_two_view_method():
    """views.preset=dino makes 6 local crops unless told (-1): a two-view method is refused before Ray,
    not at its first step; told 0, it runs on the preset's two global views."""
    cfg = load_config("simsiam_cifar10", {"views.preset": "dino"})
    with pytest.raises(ConfigError, match=r"views\.local_crops.*preset='dino'.*makes 6.*simsiam"):
        check_method_config(cfg)
    check_method_config(cfg.replace(**{"views.local_crops": 0}))
    check_method_config(load_config("byol_cifar10", {"views.preset": "dino"}))  # takes them


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_multicrop_runs_the_loop_on_real_cifar_and_its_loss_falls(cifar_small, name):
    """2 global + 2 local crops through the real loader, views and loop (no Ray): the loss falls over
    a few steps and the online probe still reads the first global view's features."""
    from sslray.raytrain.loop import run_local

    params = [f"method.params.{k}={v}" for k, v in T.PARAMS[name].items()]
    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}",
                                "ray.num_workers=1", f"method.name={name}", "views.preset=byol", "views.local_crops=2",
                                *params, "data.train_subset=64", "data.batch_size=64",
                                "optim.name=adamw", "optim.base_lr=5e-3", "optim.warmup_epochs=0",
                                "train.epochs=8", "train.max_steps_per_epoch=1"])
    last, session = run_local(cfg)
    losses = [m["loss"] for m in session.history]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0], losses
    assert 0.0 <= last["online_probe_top1"] <= 1.0
