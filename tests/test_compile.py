"""``model.compile``: torch.compile of the backbone(s) in place. Which modules it compiles, that the
compiled step gives the eager step's loss and gradients, and that a compiled run resumes an eager
checkpoint (parameter names unchanged) through the real loop, kNN monitor included."""

from __future__ import annotations

import pytest
import torch

from sslray.config import ConfigError, load_config
from sslray.raytrain.methods import compile_method, create_method

TINY = ["model.backbone=resnet10t", "model.cifar_stem=false", "model.proj_hidden_dim=32", "model.proj_out_dim=16",
        "views.crop_size=32"]
MAE = ["model.backbone=vit_tiny_patch16_224", "method.params.patch_size=8", "method.params.decoder_dim=32",
       "method.params.decoder_depth=1", "method.params.decoder_heads=2"]


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def _compiled(m: torch.nn.Module) -> bool:
    return getattr(m, "_compiled_call_impl", None) is not None


def test_compile_targets_the_student_and_teacher_backbones_or_the_method_s_blocks():
    simclr = create_method(load_config("simclr_cifar10", TINY))
    assert compile_method(simclr) == [simclr.backbone] and _compiled(simclr.backbone)
    assert not _compiled(simclr.projector)

    byol = create_method(load_config("byol_cifar10", TINY + ["method.params.pred_hidden_dim=16"]))
    targets = compile_method(byol)
    teacher_backbone = byol.target.module[0]
    assert len(targets) == 2 and targets[0] is byol.backbone and targets[1] is teacher_backbone
    assert all(_compiled(m) for m in targets)

    mae = create_method(load_config("mae_cifar10", MAE))
    targets = compile_method(mae, "max-autotune-no-cudagraphs")
    assert targets == [*mae.backbone.blocks, *mae.decoder] and all(_compiled(b) for b in targets)
    assert not _compiled(mae.backbone)  # MAE calls the blocks itself, never the whole ViT

    # VICRegL runs forward_features: the ViT's blocks or the ResNet's stages, not the backbone module
    vit = MAE[:1] + ["model.cifar_stem=false", "method.params.local_hidden_dim=32"]
    vicregl = create_method(load_config("vicregl_cifar10", vit))
    assert compile_method(vicregl) == list(vicregl.backbone.blocks)
    vicregl_r = create_method(load_config("vicregl_cifar10", TINY + ["method.params.local_hidden_dim=32"]))
    bb = vicregl_r.backbone
    assert compile_method(vicregl_r) == [bb.layer1, bb.layer2, bb.layer3, bb.layer4]

    with pytest.raises(ConfigError, match="model.compile_mode.*got 'fast'"):
        compile_method(simclr, "fast")


def test_compile_with_syncbn_on_several_gpus_is_warned_about_by_key():
    from sslray.raytrain.loop import compile_warnings

    cfg = load_config("simclr_cifar10", ["model.compile=true"])
    (w,) = compile_warnings(cfg, 2, "cuda")
    assert "model.sync_bn=false" in w and "SyncBatchNorm" in w
    assert compile_warnings(cfg, 1, "cuda") == [] and compile_warnings(cfg, 2, "cpu") == []
    assert compile_warnings(cfg.replace(**{"model.sync_bn": False}), 2, "cuda") == []
    assert compile_warnings(cfg.replace(**{"model.compile": False}), 2, "cuda") == []


@pytest.mark.slow
def test_compiled_step_gives_the_eager_loss_and_gradients(fresh_dynamo):
    """BYOL: a compiled student (forward and backward) and a compiled EMA teacher (no-grad forward)."""
    from sslray.datasets.views import build_views

    cfg = load_config("byol_cifar10", TINY + ["method.params.pred_hidden_dim=16"])
    torch.manual_seed(0)
    eager = create_method(cfg)
    compiled = create_method(cfg)
    compiled.load_state_dict(eager.state_dict())
    compile_method(compiled)
    torch.manual_seed(1)
    views = build_views(cfg.views)(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = model(views)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss_e, grads_e = step(eager)
    loss_c, grads_c = step(compiled)
    assert fresh_dynamo["stats"]["unique_graphs"] >= 2  # the student's and the teacher's graphs really compiled
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and any(n.startswith("backbone.") for n in grads_c)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-3, atol=1e-4, msg=n)


@pytest.mark.slow
def test_a_compiled_run_resumes_an_eager_checkpoint(cifar_small, tmp_path, fresh_dynamo, capsys):
    from sslray.raytrain.loop import run_local

    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}",
                                "ray.num_workers=1", "model.backbone=resnet10t", "train.epochs=1",
                                "train.max_steps_per_epoch=2", "monitor.pictures=false"])
    ckpt = str(tmp_path / "ckpt")
    first, _ = run_local(cfg, ckpt)
    assert fresh_dynamo["stats"]["unique_graphs"] == 0
    last, session = run_local(cfg.replace(**{"train.epochs": 2, "model.compile": True}), ckpt)
    assert [m["epoch"] for m in session.history] == [2] and last["step"] == 4
    assert torch.isfinite(torch.tensor(last["loss"])) and 0.0 <= last["knn_top1"] <= 1.0
    assert fresh_dynamo["stats"]["unique_graphs"] >= 2  # the training step and the no-grad feature pass
    assert "model.compile: 1 module(s) compiled" in capsys.readouterr().out


@pytest.mark.gpu
def test_compiled_step_on_cuda_with_bf16_and_channels_last(fresh_dynamo):
    """The GPU path (triton kernels, bf16 autocast, channels_last): the loss the eager step gives, and
    finite gradients, for the student and the teacher."""
    from sslray.datasets.views import build_views
    from sslray.raytrain.knn import autocast_for

    dev = torch.device("cuda")
    cfg = load_config("byol_cifar10", ["model.proj_hidden_dim=256", "method.params.pred_hidden_dim=256"])
    torch.manual_seed(0)
    eager = create_method(cfg).to(dev).to(memory_format=torch.channels_last)
    compiled = create_method(cfg).to(dev).to(memory_format=torch.channels_last)
    compiled.load_state_dict(eager.state_dict())
    compile_method(compiled)
    torch.manual_seed(1)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=dev)
    views = [v.contiguous(memory_format=torch.channels_last) for v in build_views(cfg.views).to(dev)(x)]
    losses = []
    for model in (eager, compiled):
        with autocast_for(dev, "bf16"):
            loss = model(views)["loss"]
        loss.backward()
        losses.append(loss.detach().float())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert fresh_dynamo["stats"]["unique_graphs"] >= 2
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
