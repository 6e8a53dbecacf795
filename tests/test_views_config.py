"""views.mean / views.std / views.aug: custom normalisation and per-op settings from the config reach
every view of both backends and the evaluation transform; bad values fail by key; empty settings
leave the views exactly as they were."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sslray.augconfig import AUG_KEYS, JITTER
from sslray.config import ConfigError, ViewConfig, from_dict, load_config
from sslray.datasets.views import PRESETS, AugParams, build_views, eval_transform

MEAN, STD = (0.7, 0.25, 0.1), (0.05, 0.3, 0.6)  # far from CIFAR's and ImageNet's, different per channel
# Every op off, the crop the whole image: the views are the normalised input, exactly.
NO_OP = {"hflip_p": 0.0, "jitter_p": 0.0, "grey_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0, "ratio": [1.0, 1.0]}
BACKENDS = ("fused", "kornia")


def colourful(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def normalised(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def pixels(v: torch.Tensor, p: AugParams) -> torch.Tensor:
    """A view back on the [0, 1] scale, with the view's own statistics."""
    return v * torch.tensor(p.std).view(1, 3, 1, 1) + torch.tensor(p.mean).view(1, 3, 1, 1)


def view_params(mv) -> list[AugParams]:
    return [a.params for a, n in zip(mv.augs, mv.counts) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("preset", ["simclr", "byol", "dino"])
def test_custom_mean_and_std_normalise_training_views_exactly(backend, preset):
    local = {"local_crops": 0} if preset == "dino" else {}
    vc = ViewConfig(preset=preset, backend=backend, min_scale=1.0, mean=MEAN, std=STD, aug=NO_OP, **local)
    x = colourful(4)
    torch.manual_seed(0)
    views = build_views(vc)(x)
    assert len(views) == 2
    for v in views:
        torch.testing.assert_close(v, normalised(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [32, 96])
def test_eval_transform_uses_the_configured_statistics(size):
    x = colourful(3, size)
    out = eval_transform(ViewConfig(crop_size=size, mean=MEAN, std=STD))(x)
    torch.testing.assert_close(out, normalised(x), atol=1e-5, rtol=1e-5)


def test_a_checkpoints_saved_statistics_reach_its_evaluation(tmp_path):
    """Probe, eval, kNN and export rebuild the config from the checkpoint and call ``eval_transform``."""
    from sslray.eval.features import transform_id
    from sslray.raytrain.evaluate import read_checkpoint

    cfg = load_config("simclr_cifar10", [f"views.mean={list(MEAN)}", f"views.std={list(STD)}"])
    torch.save({"config": cfg.to_dict(), "model": {}}, tmp_path / "state.pt")
    saved, _ = read_checkpoint(tmp_path / "state.pt")
    assert saved.views.mean == MEAN and saved.views.std == STD
    tid = transform_id(eval_transform(saved.views))
    assert tid["mean"] == list(MEAN) and tid["std"] == list(STD)
    old = cfg.to_dict()  # a checkpoint written before these keys: the size rule, as it always was
    for k in ("mean", "std", "aug"):
        del old["views"][k]
    assert transform_id(eval_transform(from_dict(old).views))["mean"] == [0.4914, 0.4822, 0.4465]


@pytest.mark.parametrize("preset,backend", [("simclr", "fused"), ("byol", "fused"), ("dino", "fused"),
                                            ("swav", "fused"), ("simclr", "kornia"), ("byol", "kornia")])
def test_grey_p_1_makes_every_view_grey(preset, backend):
    vc = ViewConfig(preset=preset, backend=backend, aug={"grey_p": 1})
    mv = build_views(vc)
    torch.manual_seed(0)
    views = mv(colourful(4))
    assert len(views) == sum(mv.counts) and all(p.grey_p == 1.0 for p in view_params(mv))
    for v, p in zip(views, view_params(mv)):
        g = pixels(v, p)
        torch.testing.assert_close(g[:, 0], g[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(g[:, 0], g[:, 2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hflip_p_0_never_flips(backend):
    x = colourful(64)
    off = dict(NO_OP, hflip_p=0.0)
    for seed in range(3):
        torch.manual_seed(seed)
        views = build_views(ViewConfig(preset="byol", backend=backend, min_scale=1.0, aug=off))(x)
        for v in views:
            torch.testing.assert_close(v, normalised(x, *_cifar()), atol=1e-4, rtol=1e-4)
    # the same check sees a flip: with hflip_p=1 every view is the mirror image
    torch.manual_seed(0)
    views = build_views(ViewConfig(preset="byol", backend=backend, min_scale=1.0, aug=dict(NO_OP, hflip_p=1.0)))(x)
    torch.testing.assert_close(views[0], normalised(x.flip(-1), *_cifar()), atol=1e-4, rtol=1e-4)


def _cifar():
    from sslray.datasets.views import CIFAR_MEAN, CIFAR_STD

    return CIFAR_MEAN, CIFAR_STD


def test_overrides_apply_after_preset_and_policy_to_every_view():
    """BYOL's asymmetric pair keeps its per-view values in keys not named; a named key takes one value."""
    vc = ViewConfig(preset="byol", blur=True, policy="simclr", aug={"solarize_p": 0.5, "hue": 0.0, "jitter_p": 1})
    ps = view_params(build_views(vc))
    assert [p.solarize_p for p in ps] == [0.5, 0.5]  # the simclr policy set 0, the override wins
    assert [p.jitter_p for p in ps] == [1.0, 1.0] and all(p.jitter[3] == 0.0 for p in ps)
    assert all(p.jitter[:3] == (0.4, 0.4, 0.4) for p in ps)  # the policy's 0.8s, s = 0.5; hue alone changed
    base = view_params(build_views(ViewConfig(preset="byol", blur=True, aug={"solarize_p": 0.0})))
    assert [p.blur_p for p in base] == [1.0, 0.1]
    both = view_params(build_views(ViewConfig(preset="byol", aug={"jitter": [0.1, 0.2, 0.3, 0.05], "hue": 0})))
    assert all(p.jitter == (0.1, 0.2, 0.3, 0.0) for p in both)


# A value for each views.aug key that no preset uses, so each must show up in the built views.
SAMPLE = {"hflip_p": 0.3, "jitter": [0.1, 0.2, 0.3, 0.04], "brightness": 0.11, "contrast": 0.12, "saturation": 0.13,
          "hue": 0.014, "jitter_p": 0.3, "grey_p": 0.3, "blur_p": 0.3, "blur_sigma": [0.5, 0.7], "solarize_p": 0.3,
          "ratio": [0.9, 1.1]}


@pytest.mark.parametrize("key", sorted(AUG_KEYS))
def test_every_views_aug_key_reaches_every_view(key):
    fields = {f.name for f in dataclasses.fields(AugParams)}
    assert key in fields or key in JITTER
    mv = build_views(ViewConfig(preset="dino", local_crops=2, aug={key: SAMPLE[key]}))
    want = tuple(SAMPLE[key]) if isinstance(SAMPLE[key], list) else SAMPLE[key]
    got = [p.jitter[JITTER.index(key)] if key in JITTER else getattr(p, key) for p in view_params(mv)]
    assert got == [want] * 4


@pytest.mark.parametrize("override,names", [
    (["views.aug.grayscale_p=0"], ["views.aug.grayscale_p", "grey_p", "hflip_p"]),
    (["views.aug.grey_p=1.5"], ["views.aug.grey_p", "[0, 1]"]),
    (["views.aug.hflip_p=-0.1"], ["views.aug.hflip_p", "[0, 1]"]),
    (["views.aug.hue=0.6"], ["views.aug.hue"]),
    (["views.aug.grey_p=yes"], ["views.aug.grey_p"]),
    (["views.aug.blur_sigma=[2, 1]"], ["views.aug.blur_sigma"]),
    (["views.aug.scale=[0.2, 1]"], ["views.aug.scale", "views.min_scale"]),
    (["views.aug=[0]"], ["views.aug", "mapping"]),
    (["views.mean=[0.5, 0.5]", "views.std=[0.2, 0.2, 0.2]"], ["views.mean", "3 numbers"]),
    (["views.mean=[0.5, 0.5, 0.5]", "views.std=[0.2, 0.2, 0.2, 0.2]"], ["views.std", "3 numbers"]),
    (["views.mean=[0.5, 0.5, 0.5]", "views.std=[0.2, 0, 0.2]"], ["views.std", "(0, 1]"]),
    (["views.mean=[0.5, .nan, 0.5]", "views.std=[0.2, 0.2, 0.2]"], ["views.mean", "finite"]),
    (["views.mean=[125, 123, 114]", "views.std=[63, 62, 66]"], ["views.mean", "255"]),
    (["views.mean=[0.5, 0.5, 0.5]"], ["views.mean", "views.std"]),
    (["views.preset=vicregl", "views.aug.hflip_p=0.5"], ["views.aug.hflip_p", "vicregl"]),
    (["views.preset=vicregl", "views.mean=[0.5, 0.5, 0.5]", "views.std=[0.2, 0.2, 0.2]"], ["views.mean", "vicregl"]),
])
def test_bad_settings_fail_naming_the_key(override, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for n in names:
        assert n in str(e.value), (n, str(e.value))


def test_command_line_overrides_merge_with_a_recipe_and_round_trip():
    cfg = load_config("byol_cifar10", ["views.aug.grey_p=0", "views.aug.hue=0", "views.mean=0.5,0.4,0.3",
                                       "views.std=[0.2, 0.2, 0.2]"])
    assert cfg.views.aug == {"grey_p": 0.0, "hue": 0.0}
    assert cfg.views.mean == (0.5, 0.4, 0.3) and cfg.views.std == (0.2, 0.2, 0.2)
    assert from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(**{"views.aug.blur_p": 0.5}).views.aug == {"grey_p": 0.0, "hue": 0.0, "blur_p": 0.5}


def test_a_tune_trial_can_sample_an_op_setting():
    from sslray.tune.space import parse_dist, trial_config

    base = load_config("simclr_cifar10")
    assert trial_config(base, {"views.aug.grey_p": 0.3}).views.aug == {"grey_p": 0.3}
    assert parse_dist("uniform(0, 0.5)").kind == "uniform"
    with pytest.raises(ConfigError, match="views.aug.grey_p"):
        trial_config(base, {"views.aug.grey_p": 1.5})


# Per-view (sum, sum of squares) of the views the code made before views.mean / std / aug existed, for
# seed 0 on colourful(4) (96 px: a second seeded draw of 2 images): empty settings must change nothing.
BEFORE = {
    ("simclr", "fused", 32): [(-3121.3923, 5930.5019), (586.4147, 9013.1972)],
    ("byol", "fused", 32): [(-3121.8684, 5844.4436), (582.3544, 9138.2492)],
    ("byol", "kornia", 32): [(-1574.4082, 7420.7467), (275.4093, 8527.7387)],
    ("mae", "fused", 32): [(1310.6275, 7531.3268)],
    ("dino", "fused", 96): [(17931.9727, 17963.82), (-20551.4561, 22427.6912), (5486.193, 11973.1513),
                            (-2131.62, 2354.1118), (170.2049, 4216.1103), (313.3671, 7184.2001),
                            (-6066.0335, 7492.3128), (4057.8656, 5673.742)],
}


@pytest.mark.parametrize("key", sorted(BEFORE))
def test_empty_settings_give_exactly_the_views_of_before(key):
    preset, backend, size = key
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    if size == 96:
        x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8, generator=g)
    vc = ViewConfig(preset=preset, backend=backend, crop_size=size, blur=size > 64, mean=(), std=(), aug={})
    spec = PRESETS.get(preset)(size=size, min_scale=vc.min_scale, jitter_strength=0.5, blur=size > 64)
    assert [p for p, _ in spec] == [a.params for a in build_views(vc).augs]
    torch.manual_seed(0)
    got = [s for v in build_views(vc)(x) for s in (float(v.double().sum()), float(v.double().square().sum()))]
    assert got == pytest.approx([s for pair in BEFORE[key] for s in pair], rel=1e-5, abs=1e-2)


def test_fine_tuning_trains_with_the_statistics_its_validation_uses():
    """Fine-tuning validates through eval_transform (views.mean/std); its training view must normalise alike."""
    from sslray.raytrain.finetune import FinetuneSettings, finetune_view

    s = FinetuneSettings()
    custom = load_config("simclr_cifar10", {"views.mean": [0.1, 0.2, 0.3], "views.std": [0.4, 0.5, 0.6]})
    p = finetune_view(custom, s)
    t = eval_transform(custom.views)
    assert p.mean == (0.1, 0.2, 0.3) and p.std == (0.4, 0.5, 0.6)
    assert torch.allclose(t.mean.flatten(), torch.tensor(p.mean)) and torch.allclose(t.std.flatten(), torch.tensor(p.std))
    default = load_config("simclr_cifar10")
    assert finetune_view(default, s) == PRESETS.get(s.views)(size=default.views.crop_size, min_scale=s.min_scale)[0][0]
