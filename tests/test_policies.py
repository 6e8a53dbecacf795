"""View-policy ops (sslray.datasets.policies): invariants, per-sample parameters, seeding, and the
policies that map a method's view spec to a study variant."""

from __future__ import annotations

import pytest
import torch

from sslray.datasets.policies import (
    POLICIES,
    VIEW_POLICIES,
    LoRotParams,
    apply_policy,
    dcl_apply,
    dcl_permutation,
    flip_batch,
    lorot_apply,
    lorot_params,
)
from sslray.datasets.views import PRESETS, AugParams, ViewAugment


def batch(b=16, c=3, h=32, w=32, seed=123):
    g = torch.Generator().manual_seed(seed)
    n = b * c * h * w  # distinct values in [0, 1]: every pixel is identifiable
    return (torch.randperm(n, generator=g).float() / n).reshape(b, c, h, w)


# --- every registered op ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", POLICIES.names())
def test_op_shape_range_and_seeding(name):
    x = batch()
    op = POLICIES.get(name)
    torch.manual_seed(0)
    a = op(x)
    torch.manual_seed(0)
    b = op(x)
    torch.manual_seed(1)
    c = op(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, b), "same global seed, different output"
    assert not torch.equal(a, c), "another seed gave the same output"
    # Every op only moves pixels: each image keeps its multiset of values per channel.
    assert torch.equal(a.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)


@pytest.mark.parametrize("name", POLICIES.names())
def test_op_parameters_differ_across_the_batch(name):
    x = batch(b=32)
    torch.manual_seed(0)
    y = POLICIES.get(name)(x)
    # Pixel values are distinct, so each output pixel names its source pixel: one mapping per sample.
    maps = set()
    for i in range(len(x)):
        src = x[i, 0].flatten().argsort()
        maps.add(tuple(src[torch.searchsorted(x[i, 0].flatten()[src], y[i, 0].flatten())].tolist()))
    kinds = {"vflip": 2, "flips": 4}.get(name, 16)  # the number of distinct outcomes an op can have, or many
    assert len(maps) >= kinds, f"{name}: the samples of one batch got (almost) the same parameters"


@pytest.mark.parametrize("name", POLICIES.names())
def test_op_non_square_and_odd_sizes(name):
    x = batch(b=4, h=30, w=44)
    torch.manual_seed(0)
    assert POLICIES.get(name)(x).shape == x.shape


# --- LoRot-I ---------------------------------------------------------------------------------------

def test_lorot_changes_only_one_box_which_holds_the_rotated_original():
    x = batch(b=64, h=32, w=40)
    torch.manual_seed(0)
    p = lorot_params(x)
    y = lorot_apply(x, p)
    assert set(p.k.tolist()) == {1, 2, 3}
    for i in range(len(x)):
        k, t, l, h, w = (int(v[i]) for v in (p.k, p.top, p.left, p.height, p.width))
        if k % 2:
            assert h == w, "a 90/270 turn needs a square box to keep its shape"
        box = (slice(None), slice(t, t + h), slice(l, l + w))
        ref = torch.rot90(x[i][box], k, dims=(-2, -1))
        assert torch.equal(y[i][box], ref)
        outside = torch.ones(x.shape[-2:], dtype=torch.bool)
        outside[t:t + h, l:l + w] = False
        assert torch.equal(y[i][:, outside], x[i][:, outside])
        changed = (y[i] != x[i]).any(0).nonzero()
        assert len(changed) > 0
        assert changed[:, 0].min() >= t and changed[:, 0].max() < t + h
        assert changed[:, 1].min() >= l and changed[:, 1].max() < l + w


def test_lorot_box_sizes_and_positions_vary():
    x = batch(b=64)
    torch.manual_seed(3)
    p = lorot_params(x)
    assert len(set(p.height.tolist())) > 3 and len(set(p.top.tolist())) > 3 and len(set(p.left.tolist())) > 3
    assert int(p.height.min()) >= 8 and int(p.height.max()) <= 16  # 0.25..0.5 of 32 px


# --- DCL region confusion --------------------------------------------------------------------------

def test_dcl_permutation_is_a_local_permutation():
    torch.manual_seed(0)
    grid, k = 6, 1.0
    perm = dcl_permutation(256, grid, k, "cpu")
    assert torch.equal(perm.sort(1).values, torch.arange(grid * grid).expand(256, -1))
    src_r, src_c = perm // grid, perm % grid
    pos = torch.arange(grid * grid)
    assert int((src_r - pos // grid).abs().max()) < 2 * k  # moves stay within the neighbourhood
    assert int((src_c - pos % grid).abs().max()) < 2 * k
    assert (perm != pos).any(1).float().mean() > 0.5  # most images are actually shuffled
    assert len({tuple(r.tolist()) for r in perm}) > 100  # and each its own way


def test_dcl_moves_whole_patches_and_keeps_the_pixel_multiset():
    x = batch(b=8, h=32, w=32)
    torch.manual_seed(0)
    grid = 4
    perm = dcl_permutation(len(x), grid, 1.0, "cpu")
    y = dcl_apply(x, perm, grid)
    for i in range(len(x)):
        assert torch.equal(y[i].flatten().sort().values, x[i].flatten().sort().values)
        for t in range(grid * grid):
            s = int(perm[i, t])
            tr, tc, sr, sc = t // grid, t % grid, s // grid, s % grid
            assert torch.equal(y[i, :, tr * 8:(tr + 1) * 8, tc * 8:(tc + 1) * 8],
                               x[i, :, sr * 8:(sr + 1) * 8, sc * 8:(sc + 1) * 8])


def test_dcl_leaves_the_remainder_strip_in_place():
    x = batch(b=4, h=34, w=35)
    torch.manual_seed(0)
    y = POLICIES.get("dcl")(x)
    assert torch.equal(y[:, :, 32:, :], x[:, :, 32:, :]) and torch.equal(y[:, :, :, 32:], x[:, :, :, 32:])


def test_dcl_rejects_a_grid_larger_than_the_image():
    with pytest.raises(ValueError, match="does not fit"):
        dcl_apply(batch(b=1, h=3, w=3), dcl_permutation(1, 4, 1.0, "cpu"), 4)


# --- flips (orthogonality) -------------------------------------------------------------------------

def test_flips_outputs_are_flips_of_the_input():
    x = batch(b=64)
    torch.manual_seed(0)
    y = POLICIES.get("flips")(x)
    kinds = []
    for i in range(len(x)):
        cands = {"id": x[i], "h": x[i].flip(-1), "v": x[i].flip(-2), "hv": x[i].flip(-1, -2)}
        match = [n for n, c in cands.items() if torch.equal(y[i], c)]
        assert match, f"sample {i} is not a flip of its input"
        kinds.append(match[0])
    assert set(kinds) == {"id", "h", "v", "hv"}
    torch.manual_seed(0)
    v = POLICIES.get("vflip")(x)
    assert all(torch.equal(v[i], x[i]) or torch.equal(v[i], x[i].flip(-2)) for i in range(len(x)))


def test_flip_batch_matches_torch_flip():
    x = batch(b=2, h=5, w=7)
    hf, vf = torch.tensor([True, False]), torch.tensor([True, True])
    y = flip_batch(x, hf, vf)
    assert torch.equal(y[0], x[0].flip(-1, -2)) and torch.equal(y[1], x[1].flip(-2))


# --- view policies: spec -> spec -------------------------------------------------------------------

EXPECTED_POLICIES = {"default", "simclr", "orthogonality", "lorot", "dcl", "mae"}


def test_every_policy_of_the_issue_is_registered():
    assert EXPECTED_POLICIES <= set(VIEW_POLICIES.names())


@pytest.mark.parametrize("preset", ["simclr", "byol", "dino", "mae"])
@pytest.mark.parametrize("name", VIEW_POLICIES.names())
def test_policy_keeps_the_view_structure_and_builds(preset, name):
    spec = PRESETS.get(preset)(size=32)
    out = apply_policy(spec, name)
    assert [n for _, n in out] == [n for _, n in spec]
    assert [p.size for p, _ in out] == [p.size for p, _ in spec]
    for p, _ in out:
        assert all(op in POLICIES for op in p.policies)
        torch.manual_seed(0)
        assert ViewAugment(p)(torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)).shape == (4, 3, p.size, p.size)


def test_policy_contents():
    byol = PRESETS.get("byol")(size=32)
    assert apply_policy(byol, "default") == byol
    assert all(p.policies == ("lorot",) for p, _ in apply_policy(byol, "lorot"))
    assert all(p.policies == ("dcl",) for p, _ in apply_policy(byol, "dcl"))
    assert all(p.policies == ("vflip",) and p.hflip_p == 0.5 for p, _ in apply_policy(byol, "orthogonality"))
    simclr = apply_policy(byol, "simclr")
    assert all(p.solarize_p == 0 and p.jitter == (0.4, 0.4, 0.4, 0.1) and p.grey_p == 0.2 for p, _ in simclr)
    mae = apply_policy(byol, "mae")
    assert all(p.jitter_p == p.grey_p == p.blur_p == p.solarize_p == 0 and p.scale == (0.2, 1.0) for p, _ in mae)
    # applying twice does not stack the same op twice
    assert apply_policy(apply_policy(byol, "lorot"), "lorot") == apply_policy(byol, "lorot")
    vicregl = apply_policy(PRESETS.get("vicregl")(size=32), "orthogonality")  # no hflip of its own: both flips
    assert all(p.policies == ("flips",) for p, _ in vicregl)


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(KeyError, match="lorot"):
        apply_policy(PRESETS.get("simclr")(size=32), "nope")


def test_view_augment_with_a_policy_is_seeded():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    aug = ViewAugment(AugParams(size=32, policies=("lorot", "dcl")))
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    assert torch.equal(a, aug(x))


def test_build_views_reads_views_policy():
    from sslray.config import load_config
    from sslray.datasets.views import build_views

    cfg = load_config("byol_cifar10", ["views.policy=lorot"])
    mv = build_views(cfg.views)
    assert all(a.params.policies == ("lorot",) for a in mv.augs)
    assert all(a.params.policies == () for a in build_views(load_config("byol_cifar10").views).augs)


@pytest.mark.gpu
def test_ops_run_on_the_gpu_with_parameters_drawn_there():
    x = batch(b=32).cuda()
    torch.manual_seed(0)
    p = lorot_params(x)
    assert p.k.device.type == "cuda"
    cpu = LoRotParams(*(t.cpu() for t in (p.k, p.top, p.left, p.height, p.width)))
    assert torch.equal(lorot_apply(x, p).cpu(), lorot_apply(x.cpu(), cpu))
    perm = dcl_permutation(len(x), 4, 1.0, x.device)
    assert perm.device.type == "cuda"
    assert torch.equal(dcl_apply(x, perm, 4).cpu(), dcl_apply(x.cpu(), perm.cpu(), 4))
    for name in POLICIES.names():
        torch.manual_seed(1)
        y = POLICIES.get(name)(x)
        assert y.device == x.device and torch.equal(y.flatten(2).sort(-1).values, x.flatten(2).sort(-1).values)


def test_pretrain_refuses_an_unknown_view_policy_before_starting(capsys):
    from sslray.cli import main

    assert main(["pretrain", "--recipe", "smoke", "--data", "x.beton", "--views", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown view policy 'nope'" in err and "lorot" in err
