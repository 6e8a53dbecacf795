"""Paper settings checked against formulas written out here: MoCo v3's fixed 2-D sin-cos position
embedding for ViTs (the paper code's ``vits.py``) and Barlow Twins' loss scale (solo-learn's CIFAR
recipe), with the resume defaults of both keys and their validation."""

from __future__ import annotations

import math

import pytest
import torch

from sslray.config import ConfigError, load_config
from sslray.raytrain.losses import barlow_twins_loss
from sslray.raytrain.methods import check_method_config, create_method
from sslray.raytrain.optim import build_optimizer

# A 64-px ViT-Ti/16: a 4x4 patch grid, 192 dims; small heads.
VIT = {"model.backbone": "vit_tiny_patch16_224", "views.crop_size": 64, "model.proj_hidden_dim": 32,
       "model.proj_out_dim": 16, "method.params.pred_hidden_dim": 32}
TINY_RESNET = {"model.backbone": "resnet10t", "model.cifar_stem": False, "model.proj_hidden_dim": 32,
               "model.proj_out_dim": 16, "views.crop_size": 32}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def _mocov3_reference(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's ``build_2d_sincos_position_embedding`` written out per token, in float64.

    Its ``torch.meshgrid(grid_w, grid_h)`` indexes 'ij', so flattened token m has ``grid_w = m // h`` (the
    row of a row-major grid) and ``grid_h = m % h`` (the column); the embedding is ``[sin(grid_w * o),
    cos(grid_w * o), sin(grid_h * o), cos(grid_h * o)]`` with ``o_k = 1 / T^(k / (dim / 4))``, k < dim / 4,
    after a zero row for the class token."""
    quarter = dim // 4
    omega = [1.0 / temperature ** (k / quarter) for k in range(quarter)]
    rows = [[0.0] * dim]
    for m in range(h * w):
        gw, gh = m // h, m % h
        rows.append([math.sin(gw * o) for o in omega] + [math.cos(gw * o) for o in omega]
                    + [math.sin(gh * o) for o in omega] + [math.cos(gh * o) for o in omega])
    return torch.tensor(rows, dtype=torch.float64)


def _mocov3_vit(**params):
    torch.manual_seed(0)
    over = {**VIT, **{f"method.params.{k}": v for k, v in params.items()}}
    return create_method(load_config("mocov3_imagenet", over))


def test_mocov3_vit_recipe_uses_the_paper_codes_fixed_sincos_position_embedding():
    cfg = load_config("mocov3_imagenet", VIT)
    assert cfg.method.params["fixed_pos_embed"] is True
    m = create_method(cfg)
    pos = m.backbone.pos_embed
    assert tuple(m.backbone.patch_embed.grid_size) == (4, 4) and pos.shape == (1, 17, 192)
    ref = _mocov3_reference(4, 4, 192)
    torch.testing.assert_close(pos[0].double(), ref, rtol=0, atol=1e-6)
    assert pos[0, 0].abs().sum() == 0  # the class token's position is zero
    # the row half comes first (MAE's code puts the column half first: that would be the transpose)
    assert not torch.allclose(pos[0, 2], pos[0, 5]) and pos[0, 2, :48].abs().sum() == 0  # token (0, 1)
    assert not pos.requires_grad
    teacher = m.momentum_encoder.module[0]
    assert torch.equal(teacher.pos_embed, pos) and not teacher.pos_embed.requires_grad


def test_mocov3_fixed_position_embedding_stays_fixed_in_training_and_in_the_momentum_encoder():
    """Not in the optimizer (so neither stepped nor decayed, with the recipe's decay of every
    parameter), and the EMA copies it instead of averaging it (``m t + (1 - m) t`` drifts by rounding)."""
    m = _mocov3_vit(fixed_pos_embed=True)
    pos, teacher_pos = m.backbone.pos_embed, m.momentum_encoder.module[0].pos_embed
    before = pos.detach().clone()
    opt = build_optimizer(m, "adamw", 1e-2, 0.1, decay_bias_norm=True)
    assert id(pos) not in {id(p) for g in opt.param_groups for p in g["params"]}
    qkv_before = m.backbone.blocks[0].attn.qkv.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)]
    for step in range(3):
        opt.zero_grad()
        m(views)["loss"].backward()
        opt.step()
        m.on_step(step, 100)
    assert pos.grad is None and torch.equal(pos, before) and torch.equal(teacher_pos, before)
    assert not torch.equal(m.backbone.blocks[0].attn.qkv.weight, qkv_before)  # the rest did train


def test_mocov3_position_embedding_stays_timms_learned_one_by_default():
    m = _mocov3_vit(fixed_pos_embed=False)
    assert m.backbone.pos_embed.requires_grad
    assert not torch.allclose(m.backbone.pos_embed[0].double(), _mocov3_reference(4, 4, 192), atol=1e-3)
    cifar = load_config("mocov3_cifar10")
    assert cifar.method.params.get("fixed_pos_embed", False) is False  # the ResNet recipe


def test_mocov3_fixed_position_embedding_is_a_no_op_for_a_resnet():
    def build(flag):
        torch.manual_seed(0)
        return create_method(load_config("mocov3_cifar10", {**TINY_RESNET, "method.params.pred_hidden_dim": 32,
                                                            "method.params.fixed_pos_embed": flag}))

    on, off = build(True), build(False)
    assert all(p.requires_grad for p in on.backbone.parameters())
    s_on, s_off = on.state_dict(), off.state_dict()
    assert s_on.keys() == s_off.keys() and all(torch.equal(s_on[k], s_off[k]) for k in s_on)


def test_barlow_twins_scale_loss_scales_loss_and_gradients_exactly():
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(16, 8, generator=g) * torch.linspace(0.5, 2.0, 8) + 1.0
    z2 = 0.7 * z1 + torch.randn(16, 8, generator=g)

    def loss_and_grads(scale):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = barlow_twins_loss(a, b, lambda_=5e-3, scale_loss=scale)
        loss.backward()
        return loss.detach(), a.grad, b.grad

    base = loss_and_grads(1.0)
    assert torch.equal(loss_and_grads(1.0)[0], barlow_twins_loss(z1, z2, lambda_=5e-3))  # the default is 1
    for got, ref in zip(loss_and_grads(0.25), base):  # a power of two: bit for bit
        assert torch.equal(got, ref * 0.25)
    for got, ref in zip(loss_and_grads(0.1), base):  # 0.1 is not exact in binary: equal up to rounding
        torch.testing.assert_close(got, ref * 0.1, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_barlow_twins_cifar_recipe_scales_its_loss_by_solo_learns_0_1():
    """solo-learn's CIFAR barlow.yaml (``scale_loss: 0.1``), whose lr 0.3 and LARS the recipe uses;
    the ImageNet recipe keeps the paper's unscaled loss. Through the method: the loss and every
    parameter's gradient are 0.1x those of the unscaled loss on the same weights and batch (up to
    float32 rounding; bit for bit with a power-of-two scale)."""
    assert load_config("barlowtwins_cifar10").method.params["scale_loss"] == 0.1
    assert load_config("barlowtwins_imagenet").method.params.get("scale_loss", 1.0) == 1.0

    def step(overrides):
        torch.manual_seed(0)
        m = create_method(load_config("barlowtwins_cifar10", {**TINY_RESNET, **overrides}))
        g = torch.Generator().manual_seed(4)
        loss = m([torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)])["loss"]
        loss.backward()
        return loss.detach(), [p.grad for p in m.parameters()]

    (scaled, g_scaled), (plain, g_plain) = step({}), step({"method.params.scale_loss": 1.0})
    torch.testing.assert_close(scaled, 0.1 * plain, rtol=1e-6, atol=0)
    # gradients near zero (the last bias, which the loss's standardisation cancels) carry only rounding
    atol = 1e-5 * max(float(b.abs().max()) for b in g_plain) * 0.1
    for a, b in zip(g_scaled, g_plain):
        torch.testing.assert_close(a, 0.1 * b, rtol=1e-4, atol=atol)
    quarter, g_quarter = step({"method.params.scale_loss": 0.25})
    assert torch.equal(quarter, 0.25 * plain) and all(torch.equal(a, 0.25 * b) for a, b in zip(g_quarter, g_plain))


@pytest.mark.parametrize("recipe, key, before", [("mocov3_imagenet", "fixed_pos_embed", False),
                                                 ("barlowtwins_cifar10", "scale_loss", 1.0)])
def test_a_checkpoint_from_before_the_key_resumes_as_it_was_trained(recipe, key, before):
    from sslray.raytrain.loop import as_started

    cfg = load_config(recipe)
    saved = cfg.to_dict()
    del saved["method"]["params"][key]
    del saved["views"]["mean"]  # a field that came with the key: a checkpoint from before lacks it too
    assert as_started(cfg, saved, log=lambda *_: None).method.params[key] == before
    assert as_started(cfg, cfg.to_dict(), log=lambda *_: None).method.params[key] == cfg.method.params[key]


@pytest.mark.parametrize("recipe, key, value, match", [
    ("mocov3_imagenet", "fixed_pos_embed", "sometimes", "method.params.fixed_pos_embed': expected true/false"),
    ("barlowtwins_cifar10", "scale_loss", "a lot", "method.params.scale_loss': expected a number"),
])
def test_ill_typed_values_are_refused_by_key_before_the_run_starts(recipe, key, value, match):
    with pytest.raises(ConfigError, match=match):
        check_method_config(load_config(recipe, {f"method.params.{key}": value}))


def test_a_bool_switch_written_as_text_is_read_as_a_bool():
    """A YAML ``"no"`` (quoted) or a Tune/CLI string was a true-looking str that switched the feature on."""
    m = _mocov3_vit(fixed_pos_embed="no", freeze_patch_embed="false")
    assert m.backbone.pos_embed.requires_grad and m.backbone.patch_embed.proj.weight.requires_grad
    assert not _mocov3_vit(fixed_pos_embed="yes").backbone.pos_embed.requires_grad


@pytest.mark.parametrize("value", [0, -0.1, float("inf")])
def test_barlow_twins_scale_loss_must_be_a_finite_positive_number(value):
    with pytest.raises(ConfigError, match="method.params.scale_loss"):
        create_method(load_config("barlowtwins_cifar10", {**TINY_RESNET, "method.params.scale_loss": value}))


def test_a_switch_given_as_0_or_1_is_read_as_false_or_true():
    """`method.params.norm_last_layer=0` on a command line reaches the config as the int 0 (values are
    YAML): a switch takes it, as it takes "0"/"1", and a recipe or checkpoint written with 1 still loads."""
    from sslray.raytrain.methods import _builder_and_params

    for given, want in ((0, False), (1, True), ("0", False)):
        _, params = _builder_and_params(load_config("dino_cifar10", {"method.params.norm_last_layer": given}))
        assert params["norm_last_layer"] is want
    with pytest.raises(ConfigError, match="expected true/false"):
        _builder_and_params(load_config("dino_cifar10", {"method.params.norm_last_layer": 2}))
