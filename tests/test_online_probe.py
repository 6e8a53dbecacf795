"""The online linear probe: it learns on real CIFAR-10 features, never touches the backbone (weights,
gradients, BN statistics, RNG), averages its gradients over ranks like the model, and its checkpointed
state resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sslray.datasets.views import EvalTransform
from sslray.raytrain.online_probe import OnlineProbe

CPU = torch.device("cpu")


def _net(seed: int = 0) -> nn.Module:
    """A tiny CNN with BatchNorm (so touched running statistics would show)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


def _batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 255).to(torch.uint8), torch.randint(0, 4, (n,), generator=g)


def _probe(dim=8, classes=4, seed=0, lr=1e-2) -> OnlineProbe:
    return OnlineProbe(dim, classes, EvalTransform(16), CPU, lr=lr, precision="fp32", seed=seed)


def test_probe_never_touches_the_backbone():
    net = _net()
    net.train()
    x, y = _batch(16)
    net(EvalTransform(16)(x)).pow(2).sum().backward()  # the SSL step's gradients, waiting for the optimizer
    before = {k: v.clone() for k, v in net.state_dict().items()}  # weights and BN running statistics
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    rng = torch.get_rng_state()
    probe = _probe()  # its init has its own stream too
    w0 = probe.head.weight.detach().clone()
    for _ in range(3):
        probe.step(net, x, y)
    assert not torch.equal(probe.head.weight, w0), "the probe did not train, so the test proves nothing"
    assert net.training, "the backbone's train mode was not restored"
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone state {k} changed"
    for k, p in net.named_parameters():
        assert torch.equal(p.grad, grads[k]), f"backbone gradient {k} changed"
    assert torch.equal(torch.get_rng_state(), rng), "the probe consumed the run's RNG"


def test_probe_rejects_unlabelled_data():
    with pytest.raises(ValueError, match=">= 2 classes"):
        OnlineProbe(8, 1, EvalTransform(16), CPU)


def test_probe_state_round_trips_exactly():
    net = _net()
    a = _probe()
    for s in range(3):
        a.step(net, *_batch(8, seed=s))
    b = _probe(seed=123)  # different init: everything must come from the state
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert torch.equal(a.sums, b.sums) and torch.equal(a.running_var, b.running_var)
    for p in (a, b):
        p.step(net, *_batch(8, seed=9))  # momentum buffers matter here
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    assert a.epoch_metrics(net, None) == b.epoch_metrics(net, None)


def test_max_batch_caps_the_extra_forward():
    net = _net()
    p = OnlineProbe(8, 4, EvalTransform(16), CPU, precision="fp32", max_batch=5)
    p.step(net, *_batch(16))
    assert float(p.sums[1]) == 5


def test_epoch_metrics_report_and_reset():
    net = _net()
    p = _probe()
    p.step(net, *_batch(8))
    m = p.epoch_metrics(net, [_batch(10, seed=5)])
    assert set(m) == {"online_probe_train_top1", "online_probe_train_loss", "online_probe_top1", "online_probe_top5"}
    assert all(0.0 <= m[k] <= 1.0 for k in m if k != "online_probe_train_loss") and m["online_probe_train_loss"] > 0
    assert p.epoch_metrics(net, None) == {}, "running sums are not reset at the epoch end"


def _rank_main(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        net = _net()
        p = _probe(seed=100 + rank)  # different seeds: the broadcast must align them
        for s in range(3):
            x, y = _batch(16, seed=s)
            half = slice(rank * 8, (rank + 1) * 8)
            p.step(net, x[half], y[half])
        m = p.epoch_metrics(net, [_batch(10, seed=20 + rank)])
        torch.save({"w": p.head.weight.detach(), "b": p.head.bias.detach(), "rv": p.running_var, "m": m}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: 6-25 s on a shared 2-core machine
def test_two_ranks_average_gradients_like_one_process(tmp_path):
    """2 gloo processes on halves of each batch end with the probe one process fits on the whole batch."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "probe")
    mp.spawn(_rank_main, args=(2, init, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    assert torch.equal(r0["w"], r1["w"]) and r0["m"] == r1["m"], "ranks ended with different probes"

    net = _net()
    ref = _probe(seed=100)  # rank 0's init, which the broadcast gave both ranks
    for s in range(3):
        ref.step(net, *_batch(16, seed=s))
    torch.testing.assert_close(r0["w"], ref.head.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["b"], ref.head.bias.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["rv"], ref.running_var, rtol=1e-5, atol=1e-6)
    both = [_batch(10, seed=20), _batch(10, seed=21)]
    val = ref.evaluate(net, both)
    assert r0["m"]["online_probe_top1"] == pytest.approx(val["online_probe_top1"])
    assert r0["m"]["online_probe_train_top1"] == pytest.approx(ref.epoch_metrics(net, None)["online_probe_train_top1"])


@pytest.mark.slow
def test_probe_learns_on_real_cifar_features(cifar_small):
    """A frozen random-init ResNet's features are linearly separable well above chance (10 classes)."""
    from sslray.datasets.loader import make_loader
    from sslray.raytrain.backbones import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("resnet10t", img_size=32)
    frozen = copy.deepcopy(bb.state_dict())
    evalT = EvalTransform(32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    probe = OnlineProbe(bb.num_features, 10, evalT, CPU, precision="fp32")
    train = make_loader(cifar_small["train"], 50, train=True, seed=0, res=32, device=CPU, num_workers=1)
    val = make_loader(cifar_small["test"], 100, train=False, res=32, device=CPU, num_workers=1)
    accs = []
    for epoch in range(4):
        train.next_epoch = epoch
        for x, y in train:
            probe.step(bb, x, y)
        accs.append(probe.epoch_metrics(bb, val if epoch == 3 else None))
    assert accs[-1]["online_probe_train_top1"] > accs[0]["online_probe_train_top1"]
    assert accs[-1]["online_probe_top1"] > 0.2, accs[-1]  # chance is 0.1
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in frozen.items())


@pytest.mark.slow
def test_loop_reports_probe_metrics_and_resumes_exactly(cifar_small, tmp_path):
    """Through the loop: metrics each epoch; 1 epoch + resume = 2 epochs straight (probe included);
    the SSL model ends bit-identical with the probe on or off."""
    from sslray.config import load_config
    from sslray.raytrain.loop import run_local
    from sslray.raytrain.session import load_state

    torch.set_num_threads(1)
    base = ["data.train=" + cifar_small["train"], "data.val=" + cifar_small["test"], "ray.num_workers=1",
            "train.max_steps_per_epoch=2", "data.knn_bank=64", "data.val_subset=64", "model.backbone=resnet10t",
            "train.knn_every=5"]
    cfg = load_config("smoke", base + ["train.epochs=2"])
    straight, s_straight = run_local(cfg, str(tmp_path / "a"))
    assert [sorted(k for k in m if k.startswith("online_probe")) for m in s_straight.history] == [
        ["online_probe_top1", "online_probe_top5", "online_probe_train_loss", "online_probe_train_top1"]] * 2

    run_local(cfg.replace(**{"train.epochs": 1}), str(tmp_path / "b"))
    resumed, _ = run_local(cfg, str(tmp_path / "b"))
    for k in ("loss", "online_probe_top1", "online_probe_train_top1", "online_probe_train_loss"):
        assert resumed[k] == straight[k], k
    sa, sb = (load_state(tmp_path / d / "epoch_0002", CPU) for d in ("a", "b"))
    for k, v in sa["online_probe"]["head"].items():
        assert torch.equal(v, sb["online_probe"]["head"][k]), k

    run_local(cfg.replace(**{"train.online_probe": False}), str(tmp_path / "c"))
    sc = load_state(tmp_path / "c" / "epoch_0002", CPU)
    assert sc["online_probe"] is None
    for k, v in sa["model"].items():
        assert torch.equal(v, sc["model"][k]), f"the probe changed the SSL model ({k})"




@pytest.mark.slow
def test_the_probe_reuses_the_training_forward(cifar_small, monkeypatch):
    """With a projector the probe trains on the first view's features from the SSL forward, never on
    a forward of its own: the extra-forward path is made to fail, and the run still trains the probe."""
    from sslray.config import load_config
    from sslray.raytrain.loop import run_local
    from sslray.raytrain.online_probe import OnlineProbe

    def no_extra_forward(self, backbone, x, y, ok=None):
        raise AssertionError("the probe ran its own backbone forward")

    monkeypatch.setattr(OnlineProbe, "step", no_extra_forward)
    fed = []
    real = OnlineProbe.step_features
    monkeypatch.setattr(OnlineProbe, "step_features",
                        lambda self, f, y, ok=None: (fed.append((f.shape, y.shape)), real(self, f, y, ok)))
    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}",
                                "ray.num_workers=1", "train.epochs=1", "train.max_steps_per_epoch=3",
                                "train.online_probe=true"])
    last, _ = run_local(cfg)
    per_worker = cfg.data.batch_size
    assert fed == [((per_worker, fed[0][0][1]), (per_worker,))] * 3  # one batch of first-view features per step
    assert 0.0 <= last["online_probe_top1"] <= 1.0 and "online_probe_train_top1" in last
