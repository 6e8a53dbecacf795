"""Every registered method, parametrized over the registry (timm's test_models.py pattern): built from
its own CIFAR recipe shrunk to tiny sizes, it must run forward+backward without NaN, lower its loss on
a fixed batch, and round-trip its state (EMA teachers, queues, centres) through ``state_dict``."""

from __future__ import annotations

import copy
import inspect
from functools import cache

import pytest
import torch
from torch import nn

from sslray.config import CONFIG_DIR, load_config
from sslray.datasets.views import PRESETS, MultiView
from sslray.raytrain.methods import METHODS, create_method

BATCH = 6
MULTICROP_METHODS = ("dino", "swav", "simclr", "byol", "vicreg", "barlowtwins")
TINY = {"model.backbone": "resnet10t", "model.cifar_stem": False, "model.proj_hidden_dim": 64,
        "model.proj_out_dim": 32, "views.crop_size": 32}
# Per-method shrinking of the recipe's paper-sized parts (queues, prototypes, decoders).
PARAMS = {
    # a large queue: on a fixed batch the queue fills with this batch's own keys as negatives, which
    # at 1024 entries outweighs 16 steps of learning for some draws of the views
    "mocov2": {"queue_size": 16384},
    "mocov3": {"pred_hidden_dim": 64},
    "byol": {"pred_hidden_dim": 64},
    "simsiam": {"pred_hidden_dim": 16},
    "nnclr": {"queue_size": 256, "pred_hidden_dim": 64},
    "barlowtwins": {}, "vicreg": {}, "simclr": {},
    "vicregl": {"local_hidden_dim": 32},
    "swav": {"num_prototypes": 32, "queue_size": 64, "queue_start_step": 0, "freeze_prototypes_steps": 2},
    "dino": {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32, "freeze_last_layer_epochs": 0.1},
    "mae": {"patch_size": 8, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    # a 4x4 grid: 1-2 patch target blocks, the context cut to its batch minimum
    "ijepa": {"patch_size": 8, "pred_dim": 32, "pred_depth": 1, "min_context": 4},
}
# ViTs where the method needs tokens: MAE and I-JEPA, and VICRegL's local matching (a 2x2 grid at 32 px).
EXTRA = {"mae": {"model.backbone": "vit_tiny_patch16_224"}, "ijepa": {"model.backbone": "vit_tiny_patch16_224"},
         "vicregl": {"model.backbone": "vit_tiny_patch16_224"}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def tiny_cfg(name: str):
    overrides = {**TINY, **EXTRA.get(name, {})}
    overrides.update({f"method.params.{k}": v for k, v in PARAMS.get(name, {}).items()})
    return load_config(f"{name}_cifar10", overrides)


@cache
def _fresh(name: str):
    torch.manual_seed(0)
    return create_method(tiny_cfg(name))


def build(name: str):
    """A freshly initialised model (built once per method, copied for each test)."""
    return copy.deepcopy(_fresh(name))


@cache
def _views(name: str) -> tuple[torch.Tensor, ...]:
    return tuple(_make_views(name))


def fixed_views(name: str) -> list[torch.Tensor]:
    return list(_views(name))


def _make_views(name: str, seed: int = 0) -> list[torch.Tensor]:
    """One augmented batch from the method's own preset (2 local crops for the methods that take
    multi-crop; SimCLR's 2-view path is the DDP and loop tests' default)."""
    cfg = tiny_cfg(name)
    g = torch.Generator().manual_seed(seed)
    imgs = (torch.rand(BATCH, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    preset = PRESETS.get(cfg.views.preset)
    extra = {"n_local": 2} if name in MULTICROP_METHODS else {}
    spec = preset(size=32, min_scale=cfg.views.min_scale, jitter_strength=0.5, blur=False, **extra)
    torch.manual_seed(seed)
    return MultiView(spec)(imgs)


def test_every_method_has_a_recipe_family_and_preset():
    for name in METHODS.names():
        builder = METHODS.get(name)
        assert builder.family in {"contrastive", "non-contrastive", "clustering", "distillation", "MIM"}, name
        assert builder.default_views in PRESETS, name
        cfg = load_config(f"{name}_cifar10")
        assert cfg.method.name == name and cfg.views.preset == builder.default_views
        assert set(cfg.method.params) <= set(inspect.signature(builder).parameters)


@pytest.mark.parametrize("name", MULTICROP_METHODS)
def test_multicrop_methods_train_on_the_two_global_crops_alone(name):
    """views.local_crops=0 (SwAV's 2x224 row, a small GPU, a sweep over local_crops)."""
    model = build(name)
    loss = model(fixed_views(name)[:2])["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.backbone.parameters())


@pytest.mark.parametrize("name", METHODS.names())
def test_forward_backward_no_nan(name):
    model = build(name)
    out = model(fixed_views(name))
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads, f"{name}: no gradients"
    assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradient"
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert hasattr(model, "backbone")


@pytest.mark.parametrize("name", METHODS.names())
def test_loss_falls_on_a_fixed_batch(name):
    model = build(name)
    views = fixed_views(name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    steps, losses = 16, []
    for step in range(steps):
        # the same draws each step (VICRegL's crops and solarize, MAE's masks): a truly fixed batch
        torch.manual_seed(100)
        loss = model(views)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "on_step"):
            model.on_step(step, steps)
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0], f"{name}: loss did not fall: {[round(v, 4) for v in losses]}"


@pytest.mark.parametrize("name", METHODS.names())
def test_state_dict_round_trips_exactly(name):
    model = build(name)
    views = fixed_views(name)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(2):  # move teachers, queues and centres away from their initial values
        loss = model(views)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if hasattr(model, "on_step"):
            model.on_step(step, 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    other = build(name)  # untrained: differs from ``model`` everywhere training touched
    other.load_state_dict(state)
    got = other.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), f"{name}: {k} differs after load_state_dict"
    # The stateful parts really are saved: teachers, queues, centres, step counters.
    stateful = [k for k in state if any(s in k for s in ("teacher", "target", "key_encoder", "momentum_encoder",
                                                         "queue", "support", "center", "step"))]
    if name in {"mocov2", "mocov3", "byol", "nnclr", "swav", "dino"}:
        assert stateful, f"{name}: no teacher/queue/centre in state_dict"
    # Same state + same randomness -> the same loss (queues and centres included).
    torch.manual_seed(5)
    a = model(views)["loss"]
    torch.manual_seed(5)
    b = other(views)["loss"]
    assert torch.equal(a, b), f"{name}: {float(a)} != {float(b)} after reload"
    # ... and both went on alike: that forward pushed to the queues at the same pointer and moved the
    # centres the same way (a host-side pointer left stale by the load would write elsewhere).
    after_a, after_b = model.state_dict(), other.state_dict()
    for k, v in after_a.items():
        assert torch.equal(after_b[k], v), f"{name}: {k} differs one forward after the reload"


@pytest.mark.parametrize("name", METHODS.names())
def test_global_bn_conversion_keeps_teachers_frozen(name):
    """The loop converts every BN for DDP; frozen (EMA teacher) parameters must stay frozen, or DDP
    waits for gradients that never come and the optimizer would train the teacher."""
    from sslray.raytrain.distributed import convert_global_bn

    model = build(name)
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    after = {n for n, p in convert_global_bn(model, "cpu").named_parameters() if p.requires_grad}
    assert after == before


# (method, frozen parameter, tiny params that set the frozen window to 3 of the 8 steps of 1 epoch run below)
FROZEN = [("dino", "head.last_layer.weight", {"freeze_last_layer_epochs": 0.375}),
          ("swav", "prototypes.weight", {"freeze_prototypes_steps": 3})]


@pytest.mark.parametrize("opt_name", ["sgd", "lars", "adamw"])
@pytest.mark.parametrize("name,param,window", FROZEN, ids=[f[0] for f in FROZEN])
def test_frozen_weights_stay_bit_identical_inside_the_window(name, param, window, opt_name):
    """Weight decay and momentum must not move a frozen layer (a zero gradient alone would let AdamW's
    decoupled decay and SGD/LARS's wd*w shrink it); after the window it trains."""
    from sslray.raytrain.optim import build_optimizer

    torch.manual_seed(0)
    cfg = tiny_cfg(name).replace(**{"train.epochs": 1, **{f"method.params.{k}": v for k, v in window.items()}})
    model = create_method(cfg)
    views = fixed_views(name)
    opt = build_optimizer(model, opt_name, lr=0.05, weight_decay=0.1, momentum=0.9)
    total, window_steps = 8, 3
    frozen0 = dict(model.named_parameters())[param].detach().clone()
    other0 = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    history = []
    for step in range(total):
        loss = model(views)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.on_step(step, total)
        history.append(dict(model.named_parameters())[param].detach().clone())
    for step in range(window_steps):
        assert torch.equal(history[step], frozen0), f"{name}/{opt_name}: {param} moved at step {step} while frozen"
    assert not torch.equal(history[-1], frozen0), f"{name}/{opt_name}: {param} never trained after the window"
    assert any(not torch.equal(v, other0[k]) for k, v in model.backbone.state_dict().items()), "nothing trained"


def _recording_encoder(seen: list):
    def encode(x):
        seen.append(x.clone())
        return x.flatten(1) * 1.0
    return encode


def test_mocov2_shuffled_bn_is_a_permutation_that_is_undone():
    from sslray.raytrain.methods.moco import shuffled_bn_forward

    x = torch.arange(16 * 3 * 2 * 2, dtype=torch.float32).view(16, 3, 2, 2)
    seen: list = []
    torch.manual_seed(0)
    k = shuffled_bn_forward(_recording_encoder(seen), x, groups=4)
    assert torch.equal(k, x.flatten(1)), "keys are not back in the order of their images"
    assert [c.shape[0] for c in seen] == [4, 4, 4, 4], "keys were not encoded in 4 BN groups"
    order = [int(r[0, 0, 0]) // 12 for c in seen for r in c]  # image index of every encoded row
    assert sorted(order) == list(range(16)) and order != list(range(16)), "not a shuffle of the batch"
    # Groups never drop below 2 images (BN's minimum), and groups=1 is one pass.
    seen.clear()
    shuffled_bn_forward(_recording_encoder(seen), x[:6], groups=8)
    assert [c.shape[0] for c in seen] == [2, 2, 2]


def test_mocov2_keys_use_per_group_bn_statistics():
    """With BN in the key encoder, grouped keys differ from one full-batch pass (the point of it)
    and each key equals its own group's BN of that image."""
    from sslray.raytrain.methods.moco import shuffled_bn_forward

    bn = torch.nn.BatchNorm1d(5).train()
    x = torch.randn(12, 5)
    seen: list = []

    def encode(c):
        seen.append(c.clone())
        return bn(c)

    torch.manual_seed(3)
    k = shuffled_bn_forward(encode, x, groups=3)
    assert not torch.allclose(k, bn(x), atol=1e-4)
    for c in seen:  # every image's key is its group's normalisation
        for row, key in zip(c, bn(c)):
            i = int((x == row).all(1).nonzero())
            torch.testing.assert_close(k[i], key)


def _shuffle_rank(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    from sslray.raytrain.methods.moco import shuffled_bn_forward

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different RNGs: rank 0's permutation must win
        x = torch.arange(8, dtype=torch.float32).view(8, 1) + 8 * rank  # global images 0..15
        seen: list = []
        k = shuffled_bn_forward(_recording_encoder(seen), x, groups=4)
        torch.save({"k": k, "seen": torch.cat(seen).view(-1), "groups": len(seen)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_mocov2_shuffle_across_two_ranks(tmp_path):
    """Each rank encodes a slice of the globally shuffled batch and gets its own images' keys back."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "keys")
    mp.spawn(_shuffle_rank, args=(2, f"file://{tmp_path / 'rdv'}", out), nprocs=2, join=True)
    r = [torch.load(f"{out}.{i}") for i in range(2)]
    for i in range(2):
        assert torch.equal(r[i]["k"].view(-1), torch.arange(8.0) + 8 * i), f"rank {i} got other images' keys"
        assert r[i]["groups"] == 2  # 4 groups over the global batch = 2 per rank
    encoded = torch.cat([r[0]["seen"], r[1]["seen"]])
    assert sorted(encoded.tolist()) == list(range(16)), "the ranks did not split one permutation"
    assert any(v >= 8 for v in r[0]["seen"].tolist()), "rank 0 only encoded its own images: no shuffle across ranks"


RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
METHOD_RECIPES = [r for r in RECIPES if r.rsplit("_", 1)[0] in METHODS]


def test_every_method_has_a_cifar_and_an_imagenet_recipe():
    for name in METHODS.names():
        assert f"{name}_cifar10" in RECIPES and f"{name}_imagenet" in RECIPES, name
        big = load_config(f"{name}_imagenet")
        assert big.method.name == name and big.views.crop_size == 224 and not big.model.cifar_stem
        assert big.data.decode_res >= big.views.crop_size and big.views.preset == METHODS.get(name).default_views


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_loads_with_known_method_preset_and_params(recipe):
    from sslray.config import effective_lr

    cfg = load_config(recipe)
    builder = METHODS.get(cfg.method.name)
    assert cfg.views.preset in PRESETS
    assert set(cfg.method.params) <= set(inspect.signature(builder).parameters) - {"cfg", "backbone", "feat_dim"}
    assert effective_lr(cfg) > 0 and cfg.optim.name in {"sgd", "lars", "adamw"}


@pytest.mark.slow  # full-size models (ResNet-50, ViT-S/B, 8192-wide projectors): ~1-3 s each on a CPU
@pytest.mark.parametrize("recipe", METHOD_RECIPES)
def test_every_recipe_builds_its_method_and_runs_a_tiny_batch(recipe):
    """Exactly as the recipe says (no shrinking): its backbone, heads and view preset on 2 images."""
    from sslray.datasets.views import build_views

    cfg = load_config(recipe)
    torch.manual_seed(0)
    model = create_method(cfg).train()
    size = cfg.data.decode_res
    imgs = (torch.rand(2, 3, size, size) * 255).to(torch.uint8)
    views = build_views(cfg.views)(imgs)
    assert views[0].shape[-1] == cfg.views.crop_size
    with torch.no_grad():
        loss = model(views)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss), f"{recipe}: loss {loss}"


def test_ema_teacher_update_is_the_momentum_average_and_copies_buffers():
    """t <- m t + (1 - m) s for every parameter; BN running statistics (float and the int64 batch
    counter) copied from the student, not averaged."""
    from sslray.raytrain.methods._ema import EMATeacher

    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    teacher = EMATeacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.train()(torch.randn(16, 4))  # moves the running statistics and the counter
    before = [p.clone() for p in teacher.module.parameters()]
    teacher.update(student, momentum=0.9)
    for t0, t, s in zip(before, teacher.module.parameters(), student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
        assert not t.requires_grad
    for bt, bs in zip(teacher.module.buffers(), student.buffers()):
        assert bt.dtype == bs.dtype and torch.equal(bt, bs)
    assert int(teacher.module[0][1].num_batches_tracked) == 1


@pytest.mark.parametrize("name", ["simclr", "byol", "vicreg", "barlowtwins"])
def test_multicrop_on_a_vit_takes_the_smaller_local_crops(name):
    """views.local_crops > 0 lets a ViT backbone take 16-px local crops beside its 32-px globals
    (position embeddings resampled per size); each size is one backbone pass."""
    from sslray.datasets.views import build_views

    params = {f"method.params.{k}": v for k, v in PARAMS[name].items()}
    cfg = load_config(f"{name}_cifar10", {**TINY, **params, "model.backbone": "vit_tiny_patch16_224",
                                          "views.local_crops": 2})
    torch.manual_seed(0)
    model = create_method(cfg)
    imgs = (torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    views = build_views(cfg.views)(imgs)
    assert [v.shape[-1] for v in views] == [32, 32, 16, 16]
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    out = model(views)
    out["loss"].backward()
    assert calls == [(2 * BATCH, 3, 32, 32), (2 * BATCH, 3, 16, 16)]
    assert torch.isfinite(out["loss"]) and float(model.backbone.pos_embed.grad.norm()) > 0


@pytest.mark.parametrize("name", ["simclr", "byol", "vicreg", "barlowtwins"])
def test_a_vit_takes_the_local_crops_a_preset_makes_by_default(name):
    """views.local_crops left at -1 on the dino preset: its default local crops reach the method, and a
    ViT backbone takes them (it was made to take any size only when the key was set)."""
    from sslray.datasets.views import build_views, local_crop_count

    params = {f"method.params.{k}": v for k, v in PARAMS[name].items()}
    cfg = load_config(f"{name}_cifar10", {**TINY, **params, "model.backbone": "vit_tiny_patch16_224",
                                          "views.preset": "dino", "views.local_size": 16})
    assert cfg.views.local_crops == -1 and local_crop_count(cfg.views) > 0
    model = create_method(cfg)
    imgs = (torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
    views = build_views(cfg.views)(imgs)
    assert len(views) == 2 + local_crop_count(cfg.views) and views[-1].shape[-1] == 16
    assert torch.isfinite(model(views)["loss"])


def _layout(head: nn.Module) -> list[str]:
    return [type(m).__name__ for m in head.net]


@pytest.mark.parametrize("recipe,projector,predictor", [
    # MoCo_ResNet in the paper's code: _build_mlp(2, ...) projector, _build_mlp(2, ..., last_bn=False) predictor
    ("mocov3_cifar10", ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"],
     ["Linear", "BatchNorm1d", "ReLU", "Linear"]),
    # MoCo_ViT: 3-layer projector, predictor ending in BN
    ("mocov3_imagenet", ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"],
     ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]),
])
def test_mocov3_heads_follow_the_paper_code_per_backbone(recipe, projector, predictor):
    cfg = load_config(recipe, {**TINY, "method.params.pred_hidden_dim": 64})  # sizes shrunk, layout kept
    model = create_method(cfg)
    assert _layout(model.projector) == projector and _layout(model.predictor) == predictor
    assert not model.projector.net[-1].affine  # the projector's output BN has no affine, as in SimCLR
    # _build_mlp's Linears never have a bias, also where no BN follows the predictor's last one
    assert all(m.bias is None for m in [*model.projector.net, *model.predictor.net] if isinstance(m, nn.Linear))


def test_a_timm_name_with_vit_in_it_but_no_img_size_still_builds_and_bad_kwargs_name_the_backbone():
    from sslray.raytrain.backbones import create_backbone

    assert create_backbone("fastvit_t8", img_size=32).num_features == 768  # FastViT takes no img_size
    with pytest.raises(ValueError, match="backbone 'vit_tiny_patch16_224': .*bogus_kw"):
        create_backbone("vit_tiny_patch16_224", img_size=32, bogus_kw=1)


# --- Reference forwards written from the papers (review §3: mutations M8-M10) ----------------------------
# Each builds the method as above, computes its loss by hand from the model's own submodules and compares
# with model(views)["loss"]. The models stay in train mode and every branch sees the two views as ONE
# concatenated batch, as the methods do, so BatchNorm uses the same batch statistics on both sides (no
# dropout or random ops in these backbones/heads).


def test_mocov3_loss_is_the_symmetrised_cross_view_infonce_scaled_by_2t():
    """Catches M9 (query paired with the key of its own view) and a lost 2T scale (paper code: ctr * 2T)."""
    from sslray.raytrain.losses import infonce_loss

    model = build("mocov3")
    assert model.training
    x1, x2 = fixed_views("mocov3")
    n, t = x1.shape[0], model.temperature
    with torch.no_grad():
        q = model.predictor(model.projector(model.backbone(torch.cat([x1, x2]))))
        k = model.momentum_encoder.module(torch.cat([x1, x2]))
        q1, q2, k1, k2 = q[:n], q[n:], k[:n], k[n:]
        # MoCo v3 alg. 1: ctr(q1, k2) + ctr(q2, k1), ctr = CE(q k^T / T, arange) * 2T
        ref = infonce_loss(q1, k2, None, t) * 2 * t + infonce_loss(q2, k1, None, t) * 2 * t
        same_view = infonce_loss(q1, k1, None, t) * 2 * t + infonce_loss(q2, k2, None, t) * 2 * t
    assert not torch.isclose(ref, same_view, rtol=1e-3)  # the test can tell the two pairings apart
    torch.testing.assert_close(model([x1, x2])["loss"], ref)


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_byol_and_simsiam_predict_the_other_views_target(name):
    """Catches M10 (p and t of the same view) and a wrong scale: BYOL sums 2 - 2 cos over both directions
    (eq. 2 plus its mirror), SimSiam averages -cos over both directions (eq. 2)."""
    import torch.nn.functional as F

    model = build(name)
    assert model.training
    x1, x2 = fixed_views(name)[:2]
    n = x1.shape[0]
    with torch.no_grad():
        z = model.projector(model.backbone(torch.cat([x1, x2])))
        p = model.predictor(z)
        t = model.target.module(torch.cat([x1, x2])) if name == "byol" else z
        p1, p2, t1, t2 = p[:n], p[n:], t[:n], t[n:]

        def cos(a, b):  # row-wise cosine written out
            return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

        if name == "byol":
            def mse(a, b):  # ||a/|a| - b/|b|||^2 = 2 - 2 cos, mean over the batch
                return ((F.normalize(a, dim=1) - F.normalize(b, dim=1)) ** 2).sum(1).mean()
            ref, same_view = mse(p1, t2) + mse(p2, t1), mse(p1, t1) + mse(p2, t2)
            torch.testing.assert_close(ref, (2 - 2 * cos(p1, t2)).mean() + (2 - 2 * cos(p2, t1)).mean())
        else:
            ref = -(cos(p1, t2).mean() + cos(p2, t1).mean()) / 2
            same_view = -(cos(p1, t1).mean() + cos(p2, t2).mean()) / 2
    assert not torch.isclose(ref, same_view, rtol=1e-3)
    torch.testing.assert_close(model([x1, x2])["loss"], ref)


def test_nnclr_positive_is_the_support_sets_nearest_neighbour():
    """Catches M8 (FeatureQueue.nearest returning z itself) and NNCLR pairing its neighbours with the
    wrong view's predictions: loss = (infonce(NN(z1), p2) + infonce(NN(z2), p1)) / 2 (NNCLR eq. 2)."""
    import torch.nn.functional as F

    from sslray.raytrain.losses import infonce_loss

    model = build("nnclr")
    assert model.training
    x1, x2 = fixed_views("nnclr")
    n, temp = x1.shape[0], model.temperature
    known = F.normalize(torch.randn(model.support.size, model.support.queue.shape[1],
                                    generator=torch.Generator().manual_seed(11)), dim=1)
    model.support.queue.copy_(known)
    with torch.no_grad():
        z = model.projector(model.backbone(torch.cat([x1, x2])))
        p = model.predictor(z)

        def nearest(v):  # the row of ``known`` with the largest cosine, by an explicit loop
            out = []
            for row in F.normalize(v, dim=1):
                sims = [float(row @ k) for k in known]
                out.append(known[max(range(len(sims)), key=sims.__getitem__)])
            return torch.stack(out)

        nn1, nn2 = nearest(z[:n]), nearest(z[n:])
        assert not torch.allclose(nn1, F.normalize(z[:n], dim=1), atol=1e-3)  # a neighbour is not z itself
        ref = (infonce_loss(nn1, p[n:], None, temp) + infonce_loss(nn2, p[:n], None, temp)) / 2
        with_z = (infonce_loss(z[:n], p[n:], None, temp) + infonce_loss(z[n:], p[:n], None, temp)) / 2
    assert not torch.isclose(ref, with_z, rtol=1e-3)
    torch.testing.assert_close(model([x1, x2])["loss"], ref)
    # training pushes the normalised first-view projections at the pointer (0 for a fresh queue)
    torch.testing.assert_close(model.support.queue[:n], F.normalize(z[:n], dim=1))
    torch.testing.assert_close(model.support.queue[n:], known[n:])


def test_feature_queue_push_wraps_around_and_nearest_is_by_cosine():
    """Catches a wrong wrap-around (ptr + n > size), a wrong count/ptr, and M8 (nearest returning z)."""
    from sslray.raytrain.methods._queue import FeatureQueue

    q = FeatureQueue(5, 2, "empty")
    r = torch.tensor([[float(i), float(i % 3) - 1.0] for i in range(1, 8)])  # rows r1..r7
    assert q.rows().shape == (0, 2)
    q.push(r[0:3])  # r1 r2 r3
    assert q.rows().shape == (3, 2)
    q.push(r[3:7])  # r4 r5 fill the queue, r6 r7 wrap onto r1 r2
    assert torch.equal(q.queue, torch.stack([r[5], r[6], r[2], r[3], r[4]]))
    assert int(q.ptr) == 2 and int(q.count) == 5 and q.rows().shape == (5, 2)
    q2 = FeatureQueue(3, 2, "empty")
    q2.push(r)  # more rows than the queue holds: only the last 3 are kept, written from the pointer
    assert torch.equal(q2.queue, torch.stack([r[4], r[5], r[6]])) and int(q2.ptr) == 0 and int(q2.count) == 3
    bank = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0], [0.5, -0.1]])
    q3 = FeatureQueue(5, 2, "empty")
    q3.push(bank)
    # angles: z 5.7, 88.9, 191.3, 36.9 deg; bank 0, 90, 180, 45, -11.3 deg. By cosine the neighbours are
    # bank rows 0, 1, 2, 3, returned as stored (not normalised); a dot product would give 3, 1, 2, 3 and
    # Euclidean distance 3, 1, 4, 3.
    z = torch.tensor([[10.0, 1.0], [0.1, 5.0], [-1.0, -0.2], [2.0, 1.5]])
    assert torch.equal(q3.nearest(z), torch.stack([bank[0], bank[1], bank[2], bank[3]]))


@pytest.mark.parametrize("name", METHODS.names())
def test_a_training_step_never_reads_a_tensor_on_the_host(name, monkeypatch):
    """On a GPU, turning a tensor into a Python bool or number waits for the device every step
    (SwAV's queue check read its device counter); the counters a step needs have host mirrors. Late in
    training (queues on, schedules advanced), forward, backward and on_step read no tensor value."""
    m = build(name).train()
    views = fixed_views(name)
    on_step = getattr(m, "on_step", lambda step, total: None)  # methods without state to advance have none
    for s in (0, 10**6, 2 * 10**6):  # past every queue start and warm-up of the tiny builds
        on_step(s, 10**7)

    def host_read(*args, **kwargs):
        raise AssertionError(f"{name}: a tensor was read on the host during a training step")

    for attr in ("__bool__", "item", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, attr, host_read)
    m(views)["loss"].backward()
    on_step(3 * 10**6, 10**7)


def test_dino_norm_last_layer_false_learns_each_outputs_norm_and_freezes_it_with_the_layer():
    """The paper's norm_last_layer=False (weight norm with a trainable g): the last layer's rows are
    normalised then scaled by a learned per-output norm starting at 1; frozen in epoch 1 with the layer."""
    from sslray.config import load_config
    from sslray.raytrain.methods.dino import DINOHead

    torch.manual_seed(0)
    fixed, free = DINOHead(8, 5, 16, 4), DINOHead(8, 5, 16, 4, norm_last_layer=False)
    free.load_state_dict(fixed.state_dict(), strict=False)
    assert fixed.last_scale is None and free.last_scale.shape == (5, 1)
    x = torch.randn(3, 8)
    torch.testing.assert_close(free(x), fixed(x))  # g starts at 1: the same function
    with torch.no_grad():
        free.last_scale.mul_(torch.arange(1.0, 6.0).unsqueeze(1))
    torch.testing.assert_close(free(x), fixed(x) * torch.arange(1.0, 6.0))
    free(x).sum().backward()
    assert free.last_scale.grad is not None and free.last_scale.grad.abs().sum() > 0

    cfg = load_config("dino_imagenet", {"model.backbone": "resnet10t", "model.cifar_stem": True,
                                        "method.params.out_dim": 32, "method.params.hidden_dim": 16,
                                        "method.params.bottleneck_dim": 8})
    assert cfg.method.params["norm_last_layer"] is False
    m = create_method(cfg)
    frozen = {id(p) for p in m.frozen_parameters()}
    assert frozen == {id(m.head.last_layer.weight), id(m.head.last_scale)}
    with torch.no_grad():
        m.head.last_scale.fill_(3.0)
    m.on_step(0, 100)  # the teacher's head follows the learned norms by EMA too
    teacher_scale = m.teacher.module[1].last_scale
    assert 1.0 < float(teacher_scale.mean()) < 3.0 and not teacher_scale.requires_grad


def test_mocov3_can_freeze_a_vits_random_patch_projection():
    """MoCo v3's stability fix for ViTs (sec. 4.2): the patch projection keeps its random init, and
    the optimizer leaves it out; a ResNet given the ViT recipe has none and trains every parameter."""
    from sslray.config import load_config
    from sslray.raytrain.optim import build_optimizer

    over = {"model.backbone": "vit_tiny_patch16_224", "views.crop_size": 32, "model.proj_hidden_dim": 32,
            "model.proj_out_dim": 16, "method.params.pred_hidden_dim": 32}
    cfg = load_config("mocov3_imagenet", over)
    assert cfg.method.params["freeze_patch_embed"] is True
    m = create_method(cfg)
    proj = m.backbone.patch_embed.proj
    assert not any(p.requires_grad for p in proj.parameters())
    opt = build_optimizer(m, "adamw", 1e-3, 0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not {id(p) for p in proj.parameters()} & in_opt and id(m.backbone.blocks[0].attn.qkv.weight) in in_opt
    resnet = create_method(load_config("mocov3_cifar10", {"model.backbone": "resnet10t",
                                                          "method.params.freeze_patch_embed": True}))
    assert all(p.requires_grad for p in resnet.backbone.parameters())


def test_mae_starts_from_the_papers_init_with_a_fixed_sincos_encoder_position_embedding():
    """MAE's code: the encoder's position embedding is the fixed 2-D sin-cos one (not learned), Linear
    layers and the flattened patch projection xavier-uniform with zero biases; paper_init=false keeps
    timm's learned, truncated-normal embedding."""
    import math

    from sslray.raytrain.methods.mae import sincos_pos_embed

    m = build("mae")
    bb = m.backbone
    grid = bb.patch_embed.grid_size[0]
    assert not bb.pos_embed.requires_grad
    torch.testing.assert_close(bb.pos_embed[0, 1:], sincos_pos_embed(bb.embed_dim, grid))
    assert bb.pos_embed[0, 0].abs().sum() == 0
    for lin in (bb.blocks[0].attn.qkv, bb.blocks[-1].mlp.fc2, m.decoder[0].mlp.fc1, m.decoder_pred):
        bound = math.sqrt(6 / (lin.in_features + lin.out_features))
        assert 0.9 * bound < lin.weight.abs().max() <= bound and lin.bias.abs().sum() == 0
    w = bb.patch_embed.proj.weight
    bound = math.sqrt(6 / (w[0].numel() + w.shape[0]))
    assert 0.9 * bound < w.abs().max() <= bound
    assert id(bb.pos_embed) not in {id(p) for p in m.parameters() if p.requires_grad}

    timm_init = create_method(tiny_cfg("mae").replace(**{"method.params.paper_init": False}))
    assert timm_init.backbone.pos_embed.requires_grad
