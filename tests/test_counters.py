"""Step counters kept in the checkpoint and mirrored on the host: loading a state refreshes the
mirror, so frozen windows, queue pointers and warm-ups resume where they were."""

from __future__ import annotations

import pytest
import torch

from sslray.raytrain.methods._counters import add_counters, counter, set_counter
from sslray.raytrain.methods._queue import FeatureQueue


def test_mirror_follows_set_and_load():
    a, b = torch.nn.Module(), torch.nn.Module()
    add_counters(a, "step")
    add_counters(b, "step")
    set_counter(a, "step", 41)
    assert counter(a, "step") == 41 and int(a.step) == 41
    b.load_state_dict(a.state_dict())
    assert counter(b, "step") == 41  # refreshed at load, not left at 0


def test_queue_resumes_at_its_pointer_after_load():
    q = FeatureQueue(8, 2, init="empty")
    q.push(torch.ones(3, 2))
    r = FeatureQueue(8, 2, init="empty")
    r.load_state_dict(q.state_dict())
    assert r.rows().shape == (3, 2)
    r.push(torch.full((2, 2), 2.0))
    q.push(torch.full((2, 2), 2.0))
    assert torch.equal(r.queue, q.queue) and counter(r, "ptr") == counter(q, "ptr") == 5


def test_swav_frozen_window_survives_a_resume():
    from sslray.config import load_config
    from sslray.raytrain.methods import create_method

    cfg = load_config("swav_cifar10", ["model.backbone=resnet18", "model.proj_hidden_dim=32",
                                       "model.proj_out_dim=16", "method.params.num_prototypes=8",
                                       "method.params.freeze_prototypes_steps=10"])
    m = create_method(cfg)
    assert m.frozen()
    m.on_step(19, 100)
    fresh = create_method(cfg)
    fresh.load_state_dict(m.state_dict())
    assert not fresh.frozen() and counter(fresh, "step") == 20


def _draws() -> tuple:
    """The next draws of all three streams restore_rng puts back (torch, numpy, python)."""
    import random

    import numpy as np

    return torch.rand(3), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_restore_rng_derives_a_per_rank_stream_when_the_checkpoint_has_fewer_ranks():
    """Catches a resume on more workers reusing a saved stream, or a derived seed ignoring rank or step."""
    from sslray.raytrain.rng import rank_seed, restore_rng, rng_state, seed_everything, set_rng_state

    outer = rng_state()
    try:
        seed_everything(100)
        saved0 = rng_state()
        after0 = _draws()
        seed_everything(200)
        state = {"rng_ranks": [saved0], "rng": rng_state(), "step": 7}  # saved by a one-worker run
        expect = {}
        for r in (1, 2):
            seed_everything(rank_seed(0, r, 7))
            expect[r] = _draws()
        got = {}
        for r in (0, 1, 2):
            seed_everything(999)  # whatever the stream was before the resume
            restore_rng(state, rank=r, seed=0)
            got[r] = _draws()
        assert _same(got[0], after0)  # rank 0 has its own saved state
        assert _same(got[1], expect[1]) and _same(got[2], expect[2])
        assert not torch.equal(got[1][0], got[2][0]) and got[1][1] != got[2][1] and got[1][2] != got[2][2]
        assert not torch.equal(got[1][0], got[0][0])
        restore_rng({**state, "step": 8}, rank=1, seed=0)  # the derived stream depends on the step too
        assert not torch.equal(torch.rand(3), expect[1][0])
        restore_rng(state, rank=1, seed=1)  # and on the run's seed
        assert not torch.equal(torch.rand(3), expect[1][0])
        # a one-process checkpoint (no per-rank list): rank 0 takes "rng", rank 1 the derived stream
        single = {"rng_ranks": None, "rng": saved0, "step": 7}
        restore_rng(single, rank=0, seed=0)
        assert _same(_draws(), after0)
        restore_rng(single, rank=1, seed=0)
        assert _same(_draws(), expect[1])
    finally:
        set_rng_state(outer)


def test_restore_rng_gives_each_rank_its_own_saved_state():
    """Catches restore_rng handing a rank another rank's saved streams (or rank 0's "rng") back."""
    from sslray.raytrain.rng import restore_rng, rng_state, seed_everything, set_rng_state

    outer = rng_state()
    try:
        saved, after = [], []
        for r in range(3):
            seed_everything(10 + r)
            saved.append(rng_state())
            after.append(_draws())
        seed_everything(300)
        state = {"rng_ranks": saved, "rng": rng_state(), "step": 7}
        for r in (2, 0, 1):
            seed_everything(999)
            restore_rng(state, rank=r, seed=0)
            assert _same(_draws(), after[r]), r
    finally:
        set_rng_state(outer)


def test_the_gpu_stream_is_this_rank_s_own_device_and_an_old_list_does_not_break_a_resume(monkeypatch):
    """Ray shows a worker every GPU of its group on the node: saving all of them and restoring them by
    index raised IndexError on every rank of a resume with fewer GPUs per node. One state, this device's
    generator, is saved and restored; an earlier checkpoint's list gives this device's entry if it has one."""
    from sslray.raytrain.rng import restore_rng, rng_state, set_rng_state

    saved_by = {}
    set_calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda d: saved_by.setdefault("dev", d) and torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, d: set_calls.append((st.tolist(), d)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every visible device was saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored by list index"))
    dev = torch.device("cuda", 3)
    outer = rng_state()
    try:
        s = rng_state(dev)
        assert saved_by["dev"] == dev and s["cuda"].tolist() == [7]
        restore_rng({"rng_ranks": [s, s], "rng": s, "step": 1}, rank=1, seed=0, device=torch.device("cuda", 0))
        assert set_calls == [([7], torch.device("cuda", 0))]  # on another layout: this rank's own device
        set_calls.clear()
        old = {**s, "cuda": [torch.tensor([i]) for i in range(8)]}  # an earlier version: 8 visible GPUs
        set_rng_state(old, torch.device("cuda", 2))
        set_rng_state(old, torch.device("cuda", 9))  # more GPUs now than were saved: the seeded stream stays
        assert set_calls == [([2], torch.device("cuda", 2))]
        set_rng_state(s, torch.device("cpu"))  # a CPU worker never touches CUDA
        assert len(set_calls) == 1
    finally:
        set_rng_state(outer)
