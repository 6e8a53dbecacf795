"""DDP equals one process: a 2-worker Ray Train run (gloo, through the loop's own data-parallel
wrapper) computes the same loss and the same gradients as a single process on the same global
batch, for SimCLR on ResNet-18 and for every method whose loss gathers across ranks (negatives,
batch statistics, Sinkhorn, DINO centre); for those methods also after an update, where every
tensor of the model's state (running statistics, queues, centre, teachers) must be equal, and over
the second step's loss, which reads that state.

Both sides build the model with the same seed; each rank takes its half of a fixed global batch
of views. Rank results are written to files (``Result.metrics`` is not populated without a
checkpoint), then compared on the driver.
"""

from __future__ import annotations

import os

import pytest
import torch

from sslray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GLOBAL_BATCH = 8
LR = 0.01  # the update between the two steps: small enough to keep BatchNorm well conditioned
GATHERING = ["simclr", "mocov3", "nnclr", "barlowtwins", "vicreg", "swav", "dino"]


def _cfg():
    return load_config("smoke", ["model.proj_hidden_dim=32", "model.proj_out_dim=16", "model.sync_bn=true"])


def _global_views(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g) for _ in range(2)]


def _build(cfg):
    from sslray.raytrain.rng import seed_everything
    from sslray.raytrain.methods import create_method

    seed_everything(0)
    return _nonzero_bn(create_method(cfg))


def _nonzero_bn(model):
    # timm zero-initialises each block's last BN scale, which would zero most conv gradients at
    # step 0 and make the comparison vacuous for them; give every BN a non-zero scale instead.
    # A private generator keeps the driver and the workers identical whatever ran before.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _ddp_worker(config):
    import ray.train
    from sslray.config import from_dict
    from sslray.raytrain.distributed import convert_global_bn, data_parallel

    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    r, w = ctx.get_world_rank(), ctx.get_world_size()
    model = convert_global_bn(_build(cfg), "cpu")
    if config.get("compile"):
        from sslray.raytrain.methods import compile_method
        assert compile_method(model)  # in place, as the loop does: between global BN and the DDP wrapper
    net, sync = data_parallel(model, torch.device("cpu"))
    n = GLOBAL_BATCH // w
    views = [v[r * n : (r + 1) * n] for v in _global_views()]
    out = net(views)
    out["loss"].backward()
    sync()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.save({"loss": out["loss"].detach(), "grads": _grads(model), "graphs": graphs},
               os.path.join(config["out"], f"rank{r}.pt"))
    ray.train.report({"done": 1})


def _step(model, net, sync, views: list) -> dict:
    """Forward and backward; ``net`` is ``model`` itself or its DDP wrapper (``sync`` averages then)."""
    out = net(views)
    out["loss"].backward()
    sync()
    return {"loss": out["loss"].detach(), "grads": _grads(model)}


def _update(model) -> dict:
    """A fixed SGD step, then the method's ``on_step`` (EMA teachers, queues, centres, schedules); returns
    every tensor of the model's state afterwards (BatchNorm running statistics, queues and pointers,
    DINO's centre, teachers)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad
                p.grad = None
    if hasattr(model, "on_step"):
        model.on_step(0, 10)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _methods_worker(config):
    """Every gathering method, each on the tiny test build and its own preset's views, two steps."""
    import ray.train
    import test_methods as T

    from sslray.raytrain.distributed import convert_global_bn, data_parallel

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    r, w = ctx.get_world_rank(), ctx.get_world_size()
    for name in config["methods"]:
        m = convert_global_bn(_nonzero_bn(T.build(name)), "cpu")
        net, sync = data_parallel(m, torch.device("cpu"))
        n = T.fixed_views(name)[0].shape[0] // w
        views, views2 = ([v[r * n : (r + 1) * n] for v in vs] for vs in (T.fixed_views(name), T._make_views(name, 1)))
        first = _step(m, net, sync, views)
        state = _update(m)
        second = _step(m, net, sync, views2)
        torch.save({**first, "state": state, "loss2": second["loss"]},
                   os.path.join(config["out"], f"{name}{r}.pt"))
    ray.train.report({"done": 1})


def _fit(worker, config, tmp_path, name):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(tmp_path / "storage")),
    ).fit()


def test_every_gathering_method_matches_one_process(ray_cluster, tmp_path):
    import test_methods as T

    assert T.BATCH % 2 == 0
    _fit(_methods_worker, {"out": str(tmp_path), "methods": GATHERING}, tmp_path, "ddp-methods")
    torch.set_num_threads(1)
    for name in GATHERING:
        m = _nonzero_bn(T.build(name))
        first = _step(m, m, lambda: None, T.fixed_views(name))
        _compare(tmp_path, name, first["loss"], first["grads"])
        # After one update, the state the gathered collectives keep in step: running statistics of the
        # global batch, queues filled with every rank's rows in rank order, DINO's centre, EMA teachers.
        state = _update(m)
        got = [torch.load(tmp_path / f"{name}{r}.pt")["state"] for r in range(2)]
        for r in range(2):
            assert set(got[r]) == set(state), name
            for k, v in state.items():
                torch.testing.assert_close(got[r][k], v, rtol=1e-4, atol=1e-5,
                                           msg=lambda msg, k=k, r=r: f"{name} rank {r}: {k}: {msg}")
        # The second step reads that state (queues as negatives, the centre, the teacher). Its loss only:
        # these tiny BatchNorm models are ill-conditioned after an update (a 1e-6 change of the weights,
        # step 1's rounding, moves some gradients by ~1e-3 relative), the loss stays within ~1e-5.
        second = _step(m, m, lambda: None, T._make_views(name, 1))
        for r in range(2):
            loss2 = torch.load(tmp_path / f"{name}{r}.pt")["loss2"]
            torch.testing.assert_close(loss2, second["loss"], rtol=1e-4, atol=1e-6, msg=lambda msg: f"{name}: {msg}")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_gloo_workers_match_one_process(ray_cluster, tmp_path, compiled):
    """``compiled``: the workers run ``model.compile`` (torch.compile of the backbone, with the
    gathered BatchNorm's collectives inside it) and must still match the eager single process."""
    cfg = _cfg()
    _fit(_ddp_worker, {"cfg": cfg.to_dict(), "out": str(tmp_path), "compile": compiled}, tmp_path,
         f"ddp-equivalence-{'compiled' if compiled else 'eager'}")

    ref = _build(cfg)
    loss = ref(_global_views())["loss"]
    loss.backward()
    _compare(tmp_path, "rank", loss, _grads(ref))
    graphs = [torch.load(tmp_path / f"rank{r}.pt")["graphs"] for r in range(2)]
    # Dynamo really traced the backbone on both ranks (the gathered BatchNorm's all-reduce included).
    assert all(g >= 1 for g in graphs) if compiled else graphs == [0, 0], graphs


def _compare(tmp_path, prefix, loss, ref_grads):
    total = float(torch.cat([g.reshape(-1) for g in ref_grads.values()]).norm())
    for r in range(2):
        got = torch.load(tmp_path / f"{prefix}{r}.pt")
        got_grads = got["grads"]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        assert set(got_grads) == set(ref_grads)
        for name, g in ref_grads.items():
            # DDP has averaged the ranks' gradients; they must equal the single-process gradient.
            if float(g.norm()) == 0:  # frozen for the first iterations (SwAV prototypes, DINO last layer)
                assert float(got_grads[name].norm()) == 0, f"{prefix}: {name} should have no gradient yet"
                continue
            # Relative L2 error, with a small absolute floor for gradients that are zero in exact
            # arithmetic (a bias right before a BatchNorm) and hold only rounding noise.
            err, ref = float((got_grads[name] - g).norm()), float(g.norm())
            assert err <= 1e-4 * ref + 1e-5 * total, f"{prefix} rank {r}: gradient of {name}: |diff| {err:.2e}, |ref| {ref:.2e}"
    # The check is not vacuous: nearly every parameter has a non-zero gradient.
    nonzero = sum(float(g.abs().max()) > 0 for g in ref_grads.values())
    assert nonzero >= 0.9 * len(ref_grads), f"{prefix}: only {nonzero}/{len(ref_grads)} gradients are non-zero"


def test_per_rank_batchnorm_would_differ():
    """Sanity for the test above: without global BN, half batches give a different loss, so the
    equality really depends on the gathered statistics and negatives."""
    cfg = _cfg()
    full = _build(cfg)(_global_views())["loss"]
    model = _build(cfg)
    halves = [[v[:4] for v in _global_views()], [v[4:] for v in _global_views()]]
    local = torch.stack([model(h)["loss"] for h in halves]).mean()
    assert not torch.allclose(full, local, rtol=1e-3)
