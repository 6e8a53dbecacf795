"""Step counters kept in the checkpoint and mirrored on the host: loading a state refreshes the
mirror, so frozen windows, queue pointers and warm-ups resume where they were."""

from __future__ import annotations

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
