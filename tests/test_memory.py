"""Device memory: an out-of-memory error that names the run and what to change, a batch that fits
(``data.auto_batch``), and gradient checkpointing that saves memory without changing gradients.

Out of memory is simulated where the real step would hit it: SimCLR's loss raises torch's
OutOfMemoryError whenever a worker's batch is above a limit (a CPU has no allocator limit to hit).
"""

from __future__ import annotations

import pytest
import torch

from sslray.config import load_config
from sslray.raytrain import memory as M


@pytest.fixture
def oom_above(monkeypatch):
    """``oom_above(n)``: SimCLR's loss raises OutOfMemoryError for more than n images per worker."""
    from sslray.raytrain.methods import simclr

    def arm(limit: int) -> list[int]:
        real, seen = simclr.nt_xent_loss, []

        def limited(z1, z2, *a, **k):
            seen.append(z1.shape[0])
            if z1.shape[0] > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {z1.shape[0]} MiB")
            return real(z1, z2, *a, **k)

        monkeypatch.setattr(simclr, "nt_xent_loss", limited)
        return seen

    return arm


def tiny_cfg(*extra):
    return load_config("smoke", ["ray.num_workers=1", "model.backbone=resnet10t", *extra])


def test_fit_batch_halves_until_every_worker_fits():
    tried = []
    assert M.fit_batch(64, 2, lambda b: tried.append(b) or b <= 12) == 8
    assert tried == [64, 32, 16, 8]
    assert M.fit_batch(64, 2, lambda b: True) == 64  # never grows past the configured batch
    # one worker short of memory is enough to halve for all
    votes = iter([False, True])
    assert M.fit_batch(16, 2, lambda b: True, agree=lambda ok: next(votes)) == 8
    with pytest.raises(torch.OutOfMemoryError, match="not even 2 images per worker"):
        M.fit_batch(16, 1, lambda b: False)


def test_try_step_runs_a_real_step_and_reports_oom(oom_above):
    cfg = tiny_cfg("data.batch_size=16")
    seen = oom_above(8)
    assert M.try_step(cfg, 8, torch.device("cpu")) is True
    assert M.try_step(cfg, 16, torch.device("cpu")) is False
    assert seen == [8, 16]


def test_oom_in_the_step_names_the_run_and_the_fixes(oom_above, cifar_small):
    oom_above(4)
    cfg = tiny_cfg(f"data.train={cifar_small['train']}", "data.val=", "data.batch_size=16", "train.epochs=1")
    from sslray.raytrain.loop import run_local

    with pytest.raises(M.SSLOutOfMemoryError) as err:
        run_local(cfg)
    msg = str(err.value)
    assert isinstance(err.value, torch.OutOfMemoryError)  # still torch's class for callers that catch it
    for part in ("out of memory in the training step", "method simclr", "backbone resnet10t",
                 "16 images per worker (global batch 16 over 1 worker(s))", "--batch-size 8", "data.auto_batch=true",
                 "model.grad_checkpointing=true", "Tried to allocate"):
        assert part in msg, part


@pytest.mark.slow
def test_auto_batch_trains_with_the_batch_that_fits_and_resume_keeps_it(oom_above, cifar_small, tmp_path, monkeypatch,
                                                                        capsys):
    seen = oom_above(8)
    cfg = tiny_cfg(f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}", "data.batch_size=32",
                   "data.auto_batch=true", "train.epochs=1", "train.max_steps_per_epoch=3")
    from sslray.raytrain.loop import run_local

    last, session = run_local(cfg, str(tmp_path / "ckpt"))
    assert seen[:3] == [32, 16, 8]  # the fit: 32 and 16 per worker failed, 8 fitted
    assert set(seen[3:]) == {8} and len(seen[3:]) == 3  # then every training step ran at 8
    assert last["global_batch"] == 8 and last["step"] == 3
    assert "auto batch: global batch 32 -> 8 (8 per worker)" in capsys.readouterr().out

    # Resuming keeps the checkpoint's batch without fitting again.
    import sslray.raytrain.loop as L

    monkeypatch.setattr(L, "auto_batch", lambda *a, **k: pytest.fail("resume must not fit the batch again"))
    last2, s2 = run_local(cfg.replace(**{"train.epochs": 2}), str(tmp_path / "ckpt"))
    assert [m["epoch"] for m in s2.history] == [2] and last2["global_batch"] == 8 and last2["step"] == 6


def _grads(model, views):
    model.zero_grad(set_to_none=True)
    model(views)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,backbone,extra", [
    ("simclr", "resnet10t", []),
    ("mae", "vit_tiny_patch16_224", ["method.params.patch_size=8", "method.params.decoder_dim=32",
                                     "method.params.decoder_depth=1", "method.params.decoder_heads=2"]),
])
def test_grad_checkpointing_recomputes_the_backbone_and_keeps_the_gradients(method, backbone, extra):
    from sslray.datasets.views import build_views
    from sslray.raytrain.methods import create_method

    over = [f"model.backbone={backbone}", "model.cifar_stem=false", "model.proj_hidden_dim=32",
            "model.proj_out_dim=16", "views.crop_size=32", *extra]
    cfg = load_config(f"{method}_cifar10", over)
    torch.manual_seed(0)
    plain = create_method(cfg)
    ckpt = create_method(load_config(f"{method}_cifar10", over + ["model.grad_checkpointing=true"]))
    ckpt.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    views = build_views(cfg.views)(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    block = (lambda m: m.backbone.layer2[0]) if method == "simclr" else (lambda m: m.backbone.blocks[0])
    calls = {"plain": 0, "ckpt": 0}
    block(plain).register_forward_pre_hook(lambda *a: calls.__setitem__("plain", calls["plain"] + 1))
    block(ckpt).register_forward_pre_hook(lambda *a: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    torch.manual_seed(2)
    g_plain = _grads(plain, views)
    torch.manual_seed(2)
    g_ckpt = _grads(ckpt, views)
    # the block started again in backward (a pre-hook: the recompute stops early, before forward hooks)
    assert calls["ckpt"] == 2 * calls["plain"] > 0
    assert g_plain.keys() == g_ckpt.keys()
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-4, atol=1e-5, msg=n)


def test_grad_checkpointing_on_a_backbone_without_it_names_the_key(monkeypatch):
    from sslray.raytrain.methods import create_method

    class Plain(torch.nn.Sequential):
        num_features = 4

    plain = Plain(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    monkeypatch.setattr("sslray.raytrain.methods.create_backbone", lambda *a, **k: plain)
    with pytest.raises(ValueError, match="model.grad_checkpointing.*has no set_grad_checkpointing"):
        create_method(tiny_cfg("model.grad_checkpointing=true"))


def test_auto_batch_clears_the_peak_its_trial_steps_left(monkeypatch):
    """A run's peak GPU memory (a study's peak_gpu_mem_mb) must be training's, not the largest trial step's
    (an out-of-memory attempt included). CPU stand-in: the trial step and the CUDA counters are stubbed."""
    events = []
    monkeypatch.setattr(M, "try_step", lambda cfg, b, device: events.append(("try", b)) or b <= 8)
    monkeypatch.setattr(M, "all_workers_ok", lambda ok, device: ok)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append(("reset", device)))
    cfg = M.auto_batch(tiny_cfg("data.batch_size=32"), 1, torch.device("cuda", 0), lambda *a: None)
    assert cfg.data.batch_size == 8
    assert events == [("try", 32), ("try", 16), ("try", 8), ("reset", torch.device("cuda", 0))]
    events.clear()
    M.auto_batch(tiny_cfg("data.batch_size=8"), 1, torch.device("cpu"), lambda *a: None)
    assert events == [("try", 8)]  # no CUDA call on a CPU run


@pytest.fixture
def two_ranks_without_collectives(monkeypatch):
    """This process looks like rank 0 of 2, and every torch.distributed collective fails the test."""
    import torch.distributed as dist

    from sslray.raytrain import distributed as D

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    for name in ("all_gather", "all_reduce", "broadcast", "barrier", "all_gather_object", "reduce_scatter",
                 "all_to_all", "all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "send",
                 "recv", "isend", "irecv", "reduce", "gather", "scatter", "broadcast_object_list"):
        monkeypatch.setattr(dist, name, lambda *a, _n=name, **k: pytest.fail(f"the trial step called dist.{_n}"))
    assert D.world_size() == 2


def _method_names():
    from sslray.raytrain.methods import METHODS

    return sorted(METHODS.names())


@pytest.mark.parametrize("name", _method_names())
def test_trial_step_of_every_method_calls_no_collective(name, two_ranks_without_collectives):
    """Gathers, statistics all-reduces, MoCo's shuffle broadcast, queue pushes: the trial step reaches
    no collective on any method, and the process is distributed again afterwards."""
    from conftest_runs import tiny_overrides

    from sslray.raytrain import distributed as D

    cfg = load_config(f"{name}_cifar10", [*tiny_overrides(name), "data.batch_size=8"])
    assert M.try_step(cfg, 4, torch.device("cpu")) is True
    assert D.world_size() == 2 and D.is_dist()


def test_trial_step_keeps_the_global_batch_shapes(two_ranks_without_collectives, oom_above):
    """Gathered embeddings have the global batch's rows (copies of the local ones), as in the real step."""
    from sslray.raytrain import distributed as D

    seen = oom_above(8)  # SimCLR's loss sees the gathered batch: 2 ranks x 4 images, then 2 x 8 > 8
    cfg = tiny_cfg("data.batch_size=16")
    assert M.try_step(cfg, 4, torch.device("cpu")) is True
    assert M.try_step(cfg, 8, torch.device("cpu")) is False
    assert seen == [8, 16]
    assert D.world_size() == 2 and D.is_dist()  # an out-of-memory step leaves the process distributed too


def _uneven_oom_rank(rank: int, world: int, init: str, out: str, cfg: dict, oom_above: int):
    """One rank of ``auto_batch`` where only rank 0 runs out of memory, in the backbone, before SimCLR's
    gather (as a smaller GPU would); each rank writes the batch it settled on, or its error."""
    import datetime
    import json

    import torch.distributed as dist

    from sslray.config import from_dict
    from sslray.raytrain import methods

    # A short timeout: ranks whose collectives no longer match fail in seconds instead of 30 minutes.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    torch.set_num_threads(1)
    real, tried = methods.create_method, []

    def create(c):
        model = real(c)

        def hook(module, args):
            per = args[0].shape[0] // 2  # both views in one backbone pass
            tried.append(per)
            if rank == 0 and per > oom_above:
                raise torch.OutOfMemoryError(f"CUDA out of memory (rank 0, {per} images)")

        model.backbone.register_forward_pre_hook(hook)
        return model

    methods.create_method = create
    res: dict = {"tried": tried}
    try:
        res["batch"] = M.auto_batch(from_dict(cfg), world, torch.device("cpu"), lambda *a: None).data.batch_size
    except Exception as e:  # noqa: BLE001 - reported to the test, which names it
        res["error"] = f"{type(e).__name__}: {e}"
    with open(f"{out}.{rank}", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_auto_batch_halves_on_every_rank_when_only_one_runs_out_of_memory(tmp_path):
    """The trial step talks to no other rank, so a rank out of memory before a method collective cannot
    leave the others waiting in it: both ranks halve the batch together."""
    import json
    import multiprocessing

    cfg = tiny_cfg("model.backbone=resnet10t", "data.batch_size=32").to_dict()  # 16 per worker
    out, ctx = str(tmp_path / "fit"), multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_uneven_oom_rank, args=(r, 2, f"file://{tmp_path / 'rdv'}", out, cfg, 8))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} still running after 120 s"
    res = [json.loads(open(f"{out}.{r}").read()) for r in range(2)]
    assert [r.get("error") for r in res] == [None, None], res
    assert res[0]["batch"] == res[1]["batch"] == 16, res  # 8 per worker on both ranks
    assert res[0]["tried"] == [16, 8] and res[1]["tried"] == [16, 8], res
