"""Gradient accumulation (``train.accum_steps``) through the real loop on CIFAR-10.

For a loss that is a mean over samples with nothing coupling them (MAE on a ViT, fixed views and
masks, fp32), k micro-batches of B images with accum_steps=k must train the weights one batch of kB
does, on one process and over two gloo ranks; a mid-epoch resume lands on a step boundary; the
optimizer, ``on_step`` and the gradient all-reduce run once per optimizer step.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from sslray.config import ConfigError, effective_lr, load_config

pytestmark = pytest.mark.slow


def _mae(cifar_small, *extra):
    return load_config("smoke", [
        f"data.train={cifar_small['train']}", "data.val=", "data.train_subset=128", "data.loader_workers=1",
        "method.name=mae", "model.backbone=vit_tiny_patch16_224", "views.preset=mae", "method.params.patch_size=8",
        "method.params.decoder_dim=32", "method.params.decoder_depth=1", "method.params.decoder_heads=2",
        "method.params.paper_init=true", "optim.name=sgd", "optim.base_lr=0.5", "optim.weight_decay=0",
        "optim.warmup_epochs=0.5",
        "train.precision=fp32", "train.online_probe=false", "monitor.collapse=false", "monitor.pictures=false",
        "train.max_steps_per_epoch=0", "train.epochs=1", "ray.num_workers=1", *extra])


def fixed_views_and_masks():
    """Views and MAE masks that do not depend on which batch an image is in: the image itself as its
    one view, and one mask for every image (the loop's random crops and masks are drawn per batch)."""
    from sslray.raytrain import loop
    from sslray.raytrain.methods import mae

    class Plain(torch.nn.Module):
        def forward(self, x):
            return [x.float() / 255.0 - 0.5]

    real = mae.random_masking

    def same_mask(batch, n, ratio, device=None, generator=None):
        g = torch.Generator().manual_seed(5)
        return tuple(t.expand(batch, *t.shape[1:]).to(device) for t in real(1, n, ratio, generator=g))

    return (loop, "build_views", lambda vc: Plain()), (mae, "random_masking", same_mask)


@pytest.fixture
def fixed(monkeypatch):
    for obj, name, value in fixed_views_and_masks():
        monkeypatch.setattr(obj, name, value)


def _weights(ckpt) -> dict:
    state = torch.load(sorted(ckpt.glob("epoch_0001/state.pt"))[-1], weights_only=False)
    return state["model"]


def _assert_same(a: dict, b: dict, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_two_micro_batches_train_what_one_batch_of_both_does(cifar_small, fixed, tmp_path, capsys):
    whole = _mae(cifar_small)  # batch 32: 4 steps
    accum = _mae(cifar_small, "data.batch_size=16", "train.accum_steps=2")
    assert effective_lr(accum) == effective_lr(whole)  # the lr scales with the effective batch
    a, _ = run(whole, tmp_path / "whole")
    b, _ = run(accum, tmp_path / "accum")
    assert a["step"] == b["step"] == 4 and a["lr"] == b["lr"]  # same schedule, counted in optimizer steps
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert "16 x 2 accumulated micro-batches = 32 per optimizer step" in capsys.readouterr().out
    _assert_same(_weights(tmp_path / "whole"), _weights(tmp_path / "accum"))
    # Not vacuous: the step moved the weights further than the tolerance.
    init = _mae(cifar_small, "optim.base_lr=0")
    run(init, tmp_path / "init")
    moved = max(float((x - y).abs().max()) for x, y in zip(_weights(tmp_path / "whole").values(),
                                                             _weights(tmp_path / "init").values()))
    assert moved > 1e-3


def run(cfg, ckpt):
    from sslray.raytrain.loop import run_local

    return run_local(cfg, str(ckpt))


def test_mid_epoch_resume_lands_on_a_step_boundary(cifar_small, fixed, tmp_path):
    """A mid-epoch checkpoint of an accumulating run counts whole optimizer steps; resumed from it, the
    run ends with the uninterrupted run's weights. Resumed at another accum_steps (half the batch, twice
    the micro-batches: the effective batch kept) it is allowed and said."""
    cfg = _mae(cifar_small, "data.batch_size=16", "train.accum_steps=2", "train.checkpoint_every_steps=3")
    run(cfg, tmp_path / "whole")
    mid = next((tmp_path / "whole").glob("epoch_0000.*_step_*"))
    state = torch.load(mid / "state.pt", weights_only=False)
    assert (state["step"], state["batch_in_epoch"], state["steps_per_epoch"]) == (3, 3, 4)
    shutil.copytree(mid, tmp_path / "resumed" / mid.name)
    last, s = run(cfg, tmp_path / "resumed")
    assert last["step"] == 4 and s.history[-1]["epoch"] == 1
    _assert_same(_weights(tmp_path / "whole"), _weights(tmp_path / "resumed"))

    shutil.copytree(mid, tmp_path / "other_k" / mid.name)
    lines = []
    from sslray.raytrain.loop import train_loop
    from sslray.raytrain.session import LocalSession

    other = cfg.replace(**{"data.batch_size": 8, "train.accum_steps": 4})
    train_loop(other, LocalSession(str(tmp_path / "other_k"), "false", printer=lambda m, flush=True: lines.append(m)))
    assert any("trained with train.accum_steps=2 (effective batch 32), this run uses 4 (effective batch 32)" in m
               for m in lines)
    _assert_same(_weights(tmp_path / "whole"), _weights(tmp_path / "other_k"))


def test_steps_on_step_and_all_reduce_count_optimizer_steps(cifar_small, monkeypatch, tmp_path):
    """accum_steps=3 over 8 batches: 2 optimizer steps per epoch (2 batches dropped, said once), each
    with one gradient all-reduce, one optimizer step and one on_step; images/s counts images."""
    from sslray.raytrain import distributed as D
    from sslray.raytrain import loop

    calls = {"sync": 0, "opt": 0, "on_step": [], "views": 0}
    real_dp, real_opt, real_views = D.data_parallel, loop.optimizer_from_config, loop.build_views

    def counting_dp(model, device):
        net, sync = real_dp(model, device)
        real_on_step = model.on_step
        model.on_step = lambda step, total: calls["on_step"].append((step, total)) or real_on_step(step, total)
        return net, lambda: calls.__setitem__("sync", calls["sync"] + 1) or sync()

    def counting_opt(*a):
        opt = real_opt(*a)
        real_step = opt.step
        opt.step = lambda *s, **k: calls.__setitem__("opt", calls["opt"] + 1) or real_step(*s, **k)
        return opt

    class CountingViews(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls["views"] += 1
            return self.inner(x)

    monkeypatch.setattr(D, "data_parallel", counting_dp)
    monkeypatch.setattr(loop, "optimizer_from_config", counting_opt)
    monkeypatch.setattr(loop, "build_views", lambda vc: CountingViews(real_views(vc)))
    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", "data.val=", "data.train_subset=128",
                                "data.batch_size=16", "train.accum_steps=3", "method.name=byol",
                                "views.preset=byol", "model.backbone=resnet10t", "train.max_steps_per_epoch=0",
                                "train.epochs=2", "ray.num_workers=1", "train.online_probe=true",
                                "monitor.pictures=false", "train.log_every=1"])
    lines = []
    from sslray.raytrain.session import LocalSession

    session = LocalSession(str(tmp_path / "c"), "false", printer=lambda m, flush=True: lines.append(m))
    last = loop.train_loop(cfg, session)
    assert calls["views"] == 12 and calls["sync"] == calls["opt"] == 4
    assert calls["on_step"] == [(s, 4) for s in range(4)]  # schedules over 4 optimizer steps
    assert last["step"] == 4 and [m["step"] for m in session.history] == [2, 4]
    for m in session.history:  # 2 steps of 48 images per epoch
        assert m["images_per_sec"] * m["epoch_seconds"] == pytest.approx(96, rel=1e-6)
    assert sum("the last 2 batch(es) of each epoch are not trained on" in m for m in lines) == 1
    assert sum("BatchNorm statistics come from one micro-batch" in m for m in lines) == 1
    assert [m.split(" loss")[0] for m in lines if m.startswith("epoch 1/2 step")] == \
        ["epoch 1/2 step 1/2", "epoch 1/2 step 2/2"]
    assert 0.0 <= last["online_probe_train_top1"] <= 1.0


def test_accum_steps_is_a_positive_integer(cifar_small):
    for bad in ("0", "-2", "1.5", "two"):
        with pytest.raises(ConfigError, match="train.accum_steps"):
            load_config("smoke", [f"train.accum_steps={bad}"])
    assert load_config("smoke").train.accum_steps == 1
    from sslray.raytrain.data import plan_data

    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", "data.train_subset=64", "data.val=",
                                "train.accum_steps=4"])
    with pytest.raises(ValueError, match="train.accum_steps"):  # 4 x 32 images, 64 there
        plan_data(cfg, 1)


def test_auto_batch_can_keep_the_effective_batch(monkeypatch):
    """data.auto_batch_accum: the halvings raise accum_steps, the effective batch and lr stay."""
    from sslray.raytrain import memory

    monkeypatch.setattr(memory, "try_step", lambda cfg, b, dev: b <= 8)
    cfg = load_config("smoke", ["data.batch_size=64", "data.auto_batch=true", "data.auto_batch_accum=true"])
    lines = []
    new = memory.auto_batch(cfg, 2, torch.device("cpu"), lines.append)
    assert (new.data.batch_size, new.train.accum_steps) == (16, 4)
    assert effective_lr(new) == effective_lr(cfg) and "train.accum_steps 1 -> 4" in lines[-1]
    plain = memory.auto_batch(cfg.replace(**{"data.auto_batch_accum": False}), 2, torch.device("cpu"), lines.append)
    assert (plain.data.batch_size, plain.train.accum_steps) == (16, 1)
    # 100 per worker fits at 12 (after 50 and 25): 10 micro-batches of 10 keep all 100, not 8 x 12 = 96
    monkeypatch.setattr(memory, "try_step", lambda cfg, b, dev: b <= 12)
    odd = memory.auto_batch(cfg.replace(**{"data.batch_size": 200}), 2, torch.device("cpu"), lines.append)
    assert (odd.data.batch_size, odd.train.accum_steps) == (20, 10) and "kept" in lines[-1]
    assert [memory.accum_split(p, f) for p, f in ((64, 16), (100, 12), (7, 3), (6, 4))] == [
        (16, 4), (10, 10), (3, 2), (3, 2)]  # 7 has no split into 2..3: 3 x 2 = 6, said in the log


def _rank_main(rank: int, world: int, init: str, cfg_dict: dict, ckpt: str):
    import torch.distributed as dist

    from sslray.config import from_dict
    from sslray.raytrain.loop import train_loop
    from sslray.raytrain.session import LocalSession

    for obj, name, value in fixed_views_and_masks():
        setattr(obj, name, value)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        train_loop(from_dict(cfg_dict), LocalSession(ckpt, "cpu", printer=lambda *a, **k: None))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_accumulating_train_what_one_process_does(cifar_small, fixed, tmp_path):
    """2 ranks x 2 micro-batches of 16 images = one process's step of 64: the gradients are summed over
    the micro-batches, then averaged over the ranks once. 64 images: every step covers them all, so
    the two runs see the same images per step whichever rank's shard they are in."""
    import torch.multiprocessing as mp

    base = ["data.train_subset=64", "train.epochs=2"]
    ddp = _mae(cifar_small, *base, "data.batch_size=32", "train.accum_steps=2", "ray.num_workers=2")
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'rdv'}", ddp.to_dict(), str(tmp_path / "ddp")), nprocs=2,
             join=True)
    one = _mae(cifar_small, *base, "data.batch_size=64")
    last, _ = run(one, tmp_path / "one")
    assert last["step"] == 2
    got = torch.load(tmp_path / "ddp" / "epoch_0002" / "state.pt", weights_only=False)
    assert got["step"] == 2
    _assert_same(torch.load(tmp_path / "one" / "epoch_0002" / "state.pt", weights_only=False)["model"],
                 got["model"])


def test_a_non_finite_micro_batch_skips_or_stops_its_whole_step(cifar_small, poison_loss):
    """The health check runs once per optimizer step on the step's loss and summed gradients: a NaN in
    the second step's first micro-batch makes that step (not a micro-batch) skipped, or stops the run
    naming optimizer step 1."""
    from sslray.raytrain.loop import NonFiniteLossError, run_local

    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", "data.val=", "data.train_subset=128",
                                "data.batch_size=16", "train.accum_steps=2", "model.backbone=resnet10t",
                                "train.max_steps_per_epoch=0", "train.epochs=1", "ray.num_workers=1",
                                "train.online_probe=false", "monitor.pictures=false"])
    poison_loss(3)
    with pytest.raises(NonFiniteLossError, match=r"simclr: non-finite loss .* at step 1 "):
        run_local(cfg)
    poison_loss(3)
    last, _ = run_local(cfg.replace(**{"monitor.max_nonfinite_skips": 1}))
    assert last["step"] == 4 and last["nonfinite_skipped_frac"] == pytest.approx(1 / 4)
    assert torch.isfinite(torch.tensor(last["loss"]))


def test_the_online_probe_encodes_at_most_one_micro_batch_again():
    """A probe without the method's features encodes its images again after the step: with
    online_probe_batch 0 ("all") and k micro-batches that is one micro-batch's worth, not k of them in
    one forward (the peak memory accumulation was set to avoid)."""
    from sslray.raytrain.accum import Accumulator

    for rows, want in ((0, 8), (5, 5), (12, 12)):
        acc = Accumulator(3, probe_rows=rows)
        for i in range(3):
            x, y = torch.full((8, 3, 2, 2), i, dtype=torch.uint8), torch.full((8,), i)
            acc.keep_probe(None, x, y)
        f, px, py = acc.probe_batch()
        assert f is None and len(px) == len(py) == want, (rows, len(py))
        assert py.tolist() == sorted(py.tolist())  # the first micro-batches' images, in order
    acc = Accumulator(2)
    for i in range(2):
        acc.keep_probe(torch.full((8, 4), float(i)), torch.zeros(8, 3, 2, 2), torch.full((8,), i))
    f, px, py = acc.probe_batch()
    assert px is None and f.shape == (16, 4)  # features from the step's forwards cost nothing more: all kept


def test_auto_batch_accum_without_auto_batch_is_refused_by_key():
    with pytest.raises(ConfigError, match="data.auto_batch_accum.*data.auto_batch=true"):
        load_config("smoke", ["data.auto_batch_accum=true"])
