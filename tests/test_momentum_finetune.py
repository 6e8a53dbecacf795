"""The EMA teachers' momentum end value (``method.params.momentum_end``) and fine-tuning of the tensors
pretraining keeps frozen (MoCo v3's patch projection and sin-cos position embedding, MAE's fixed one).

The momentum schedule is checked against BYOL's formula written out here (sec. 3.2,
``1 - (1 - base) (cos(pi k / K) + 1) / 2``); fine-tuning against the MAE / MoCo v3 recipes, which train
every backbone parameter from its pretrained value."""

from __future__ import annotations

import math

import pytest
import torch

import test_methods as T
from test_paper_fidelity import VIT  # a 64-px ViT-Ti/16 (4x4 patches, 192 dims) and small heads
from sslray.config import ConfigError, load_config
from sslray.raytrain.methods import METHODS, create_method
from sslray.raytrain.methods._ema import EMATeacher, ema_momentum
from sslray.raytrain.optim import cosine_momentum

EMA_METHODS = ("byol", "dino", "ijepa", "mocov2", "mocov3")
# mocov2's recipe keeps its momentum constant (the paper's); the cosine schedule is the one that ends.
# I-JEPA's default is linear (tests/test_ijepa.py); here it runs the cosine the others share.
COSINE = {"mocov2": {"momentum_schedule": "cosine"}, "ijepa": {"momentum_schedule": "cosine"}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread


def _byol_formula(step: int, total: int, base: float) -> float:
    """The schedule as it was before ``momentum_end``: BYOL's, ending at 1."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def _cfg(name: str, **params):
    over = {**T.TINY, **T.EXTRA.get(name, {})}
    over.update({f"method.params.{k}": v for k, v in {**T.PARAMS.get(name, {}), **params}.items()})
    return load_config(f"{name}_cifar10", over)


# --- momentum_end --------------------------------------------------------------------------------------

@pytest.mark.parametrize("base, end, total", [(0.996, 1.0, 1000), (0.99, 0.999, 50), (0.99, 0.9995, 7),
                                              (0.9, 0.9, 10)])
def test_the_cosine_schedule_goes_from_base_to_the_end_value_and_never_falls(base, end, total):
    values = [cosine_momentum(s, total, base, end) for s in range(total + 1)]
    assert values[0] == base and values[-1] == end
    assert all(b >= a for a, b in zip(values, values[1:]))
    # the loop applies steps 0 .. total - 1: the last update falls short of the end by (end - base)
    # sin^2(pi / 2K), a hair in a run of any length
    assert values[-2] == pytest.approx(end - (end - base) * math.sin(math.pi / (2 * total)) ** 2, abs=1e-15)
    assert [ema_momentum(s, total, base, "cosine", end) for s in range(total + 1)] == values
    assert ema_momentum(total, total, base, "constant", 1.0) == base


@pytest.mark.parametrize("base", [0.9, 0.99, 0.996, 0.9995])
def test_the_default_end_is_the_old_schedule_bit_for_bit(base):
    for total in (1, 7, 1000):
        for s in range(total + 1):
            old = _byol_formula(s, total, base)
            assert cosine_momentum(s, total, base) == old and cosine_momentum(s, total, base, 1.0) == old
            assert ema_momentum(s, total, base) == old and ema_momentum(s, total, base, "cosine", 1.0) == old


def test_every_method_with_an_ema_teacher_takes_momentum_end():
    """Parametrized over the registry: a method gets the key exactly when its model holds an EMA teacher."""
    import inspect

    with_ema = {n for n in METHODS.names() if any(isinstance(m, EMATeacher) for m in T.build(n).modules())}
    takes = {n for n in METHODS.names() if "momentum_end" in inspect.signature(METHODS.get(n)).parameters}
    assert with_ema == takes == set(EMA_METHODS)


@pytest.mark.parametrize("name", EMA_METHODS)
def test_the_teacher_update_uses_the_end_value(name, monkeypatch):
    seen = []
    real = EMATeacher.update

    def spy(self, *students, momentum):
        seen.append(momentum)
        real(self, *students, momentum=momentum)

    monkeypatch.setattr(EMATeacher, "update", spy)
    params = {**COSINE.get(name, {}), "momentum": 0.99, "momentum_end": 0.999}
    torch.manual_seed(0)
    model = create_method(_cfg(name, **params))
    teacher = next(m for m in model.modules() if isinstance(m, EMATeacher))
    student = [p for p in model.backbone.parameters() if p.requires_grad][0]
    t_param = [p for p, s in zip(teacher.module[0].parameters(), model.backbone.parameters()) if s.requires_grad][0]
    with torch.no_grad():
        student.add_(1.0)  # the student has moved: the update must pull the teacher by 1 - momentum
    before = t_param.detach().clone()
    total = 10
    model.on_step(total // 2, total)
    m_mid = seen[-1]
    assert m_mid == pytest.approx((0.99 + 0.999) / 2)
    torch.testing.assert_close(t_param, m_mid * before + (1 - m_mid) * student.detach())
    model.on_step(0, total)
    model.on_step(total, total)  # the schedule's end, one step past the loop's last
    assert seen[-2:] == [0.99, 0.999]
    # the default ends at 1, as before
    seen.clear()
    torch.manual_seed(0)
    default = create_method(_cfg(name, **{**COSINE.get(name, {}), "momentum": 0.99}))
    default.on_step(3, total)
    assert seen == [_byol_formula(3, total, 0.99)]


@pytest.mark.parametrize("name", EMA_METHODS)
def test_the_schedule_picture_ends_at_the_end_value(name):
    from sslray.raytrain.pictures import schedule_series

    cfg = _cfg(name, **{**COSINE.get(name, {}), "momentum": 0.99, "momentum_end": 0.9995})
    torch.manual_seed(0)
    steps, s = schedule_series(cfg, create_method(cfg), total=200, warmup=10, peak=0.5)
    m = s["ema_momentum"]
    assert m[0] == 0.99 and m[-1] == pytest.approx(0.9995, abs=1e-6) and m[-1] < 0.9995
    assert m == [cosine_momentum(int(k), 200, 0.99, 0.9995) for k in steps]


@pytest.mark.parametrize("name, params, match", [
    ("byol", {"momentum": 0.99, "momentum_end": 0.98}, "must be a finite number from method.params.momentum"),
    ("mocov3", {"momentum_end": 1.001}, "must be a finite number from method.params.momentum"),
    ("dino", {"momentum_end": float("nan")}, "must be a finite number"),
    ("dino", {"momentum_end": float("inf")}, "must be a finite number"),
    ("mocov2", {"momentum_schedule": "cosine", "momentum_end": -1}, "must be a finite number"),
    ("mocov2", {"momentum_end": 0.9995}, "the constant momentum schedule keeps method.params.momentum"),
    ("byol", {"momentum_end": "high"}, "expected a number"),
])
def test_bad_end_values_are_refused_naming_the_key(name, params, match):
    with pytest.raises(ConfigError, match=r"config key 'method\.params\.momentum_end': " + match):
        create_method(_cfg(name, **params))


def test_momentum_end_is_unknown_to_methods_without_a_teacher():
    with pytest.raises(ValueError, match=r"unknown key\(s\) method\.params\.momentum_end for method 'simsiam'"):
        create_method(_cfg("simsiam", momentum_end=0.999))


# --- fine-tuning trains what pretraining froze ---------------------------------------------------------

def _mocov3_checkpoint(tmp_path):
    """A MoCo v3 ViT state.pt with the paper's frozen patch projection and fixed sin-cos embedding."""
    cfg = load_config("mocov3_imagenet", {**VIT, "method.params.freeze_patch_embed": True,
                                          "method.params.fixed_pos_embed": True})
    torch.manual_seed(0)
    model = create_method(cfg)
    assert not model.backbone.pos_embed.requires_grad and not model.backbone.patch_embed.proj.weight.requires_grad
    folder = tmp_path / "run" / "epoch_0001"
    folder.mkdir(parents=True)
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "epoch": 1, "step": 10}, folder / "state.pt")
    return model.eval(), folder / "state.pt"


def _check_finetune_trains_everything(backbone, pretrained: dict, size: int):
    """``backbone`` as ``finetune_loop`` gets it: every parameter trains, from its pretrained value, in
    AdamW's groups with the fine-tune decay rules, and one step moves the embeddings."""
    from sslray.raytrain.finetune import Classifier, layer_decay_groups

    net = Classifier(backbone, int(backbone.num_features), 10)
    names = dict(net.backbone.named_parameters())
    assert all(p.requires_grad for p in names.values()), [n for n, p in names.items() if not p.requires_grad]
    for n, p in names.items():
        assert torch.equal(p.detach(), pretrained[n]), n
    groups = layer_decay_groups(net, 0.05, 0.75)
    where = {id(p): g for g in groups for p in g["params"]}
    assert all(id(p) in where for p in net.parameters())
    for n in ("pos_embed", "cls_token"):
        assert where[id(names[n])]["weight_decay"] == 0 and where[id(names[n])]["layer_id"] == 0
    proj = where[id(names["patch_embed.proj.weight"])]
    assert proj["weight_decay"] == 0.05 and proj["layer_id"] == 0
    opt = torch.optim.AdamW(groups, lr=1e-3)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    torch.nn.functional.cross_entropy(net(x), torch.tensor([1, 2])).backward()
    opt.step()
    for n in ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert not torch.equal(names[n].detach(), pretrained[n]), f"{n} did not train"


def test_finetuning_a_mocov3_vit_trains_its_patch_projection_and_position_embedding(tmp_path):
    from sslray.raytrain.evaluate import load_checkpoint

    model, state = _mocov3_checkpoint(tmp_path)
    pretrained = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    _, loaded, _ = load_checkpoint(state, torch.device("cpu"))
    _check_finetune_trains_everything(loaded.backbone, pretrained, 64)


def test_the_random_init_baseline_trains_the_same_parameters():
    from sslray.raytrain.evaluate import random_init_model

    cfg = load_config("mocov3_imagenet", {**VIT, "method.params.freeze_patch_embed": True,
                                          "method.params.fixed_pos_embed": True})
    bb = random_init_model(cfg).backbone
    _check_finetune_trains_everything(bb, {n: p.detach().clone() for n, p in bb.named_parameters()}, 64)


def test_finetuning_an_mae_vit_trains_its_fixed_position_embedding():
    torch.manual_seed(0)
    model = create_method(_cfg("mae"))  # paper_init: the fixed sin-cos embedding, frozen in pretraining
    assert not model.backbone.pos_embed.requires_grad
    bb = model.backbone
    _check_finetune_trains_everything(bb, {n: p.detach().clone() for n, p in bb.named_parameters()}, 32)


def test_the_export_keeps_the_fixed_position_embedding_and_patch_projection(tmp_path):
    """Frozen tensors are parameters still: the exported file holds them and loads back the same."""
    from safetensors.torch import load_file

    from sslray.export import WEIGHTS, export_backbone, load_backbone
    from sslray.raytrain.methods._posembed import sincos_pos_embed

    model, _ = _mocov3_checkpoint(tmp_path)
    out = export_backbone(tmp_path / "run", tmp_path / "exp")
    weights = load_file(str(out / WEIGHTS))
    saved = model.backbone.state_dict()
    for n in ("pos_embed", "patch_embed.proj.weight"):
        assert torch.equal(weights[n], saved[n]), n
    loaded, _ = load_backbone(out)
    torch.testing.assert_close(loaded.pos_embed, model.backbone.pos_embed, rtol=0, atol=0)
    torch.testing.assert_close(loaded.pos_embed[0, 1:], sincos_pos_embed(192, (4, 4)), rtol=0, atol=0)
    torch.testing.assert_close(loaded.patch_embed.proj.weight, model.backbone.patch_embed.proj.weight, rtol=0, atol=0)
