"""Every rank draws its own views (and masks, crops): two gloo processes run the real loop on CIFAR-10.

With one random stream shared by every rank, image i of each worker's shard got the same crop, jitter
and mask, so a global batch held batch/workers independent draws. A resumed run puts each rank's own
stream back, so it draws what the uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

pytestmark = pytest.mark.slow  # two spawned processes running the loop


def _rank_main(rank: int, world: int, init: str, out: str, cfg_dict: dict, runs: list):
    import torch.distributed as dist

    import sslray.raytrain.loop as L
    from sslray.config import from_dict
    from sslray.raytrain.session import LocalSession

    class Recorder(torch.nn.Module):
        """The loop's view module, noting the state of the RNG it draws from at each call."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.states = inner, []

        def forward(self, x):
            self.states.append(hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16])
            return self.inner(x)

    made: list = []
    real = L.build_views
    L.build_views = lambda vc: made.append(Recorder(real(vc))) or made[-1]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        cfg = from_dict(cfg_dict)
        quiet = lambda *a, **k: None  # noqa: E731
        for ckpt, epochs in runs:
            L.train_loop(cfg.replace(**{"train.epochs": epochs}), LocalSession(ckpt, "cpu", printer=quiet))
        with open(f"{out}.{rank}", "w") as f:
            json.dump([m.states for m in made], f)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, cfg, runs, tag):
    import torch.multiprocessing as mp

    out = str(tmp_path / tag)
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / ('rdv-' + tag)}", out, cfg.to_dict(), runs), nprocs=2,
             join=True)
    return [json.loads(open(f"{out}.{r}").read()) for r in range(2)]


def test_ranks_draw_their_own_views_and_resume_them(cifar_small, tmp_path):
    from sslray.config import load_config

    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", "data.val=", "ray.num_workers=2",
                                "train.max_steps_per_epoch=2", "train.online_probe=false", "monitor.collapse=false"])
    whole = _spawn(tmp_path, cfg, [(str(tmp_path / "a"), 2)], "whole")
    r0, r1 = whole[0][0], whole[1][0]
    assert len(r0) == len(r1) == 4
    assert not set(r0) & set(r1), "rank 1 drew its views from the same random stream as rank 0"
    assert len(set(r0)) == 4, "rank 0's stream did not move between steps"

    # Stop after epoch 1 and resume from its checkpoint: epoch 2 draws what the whole run drew, per rank.
    split = _spawn(tmp_path, cfg, [(str(tmp_path / "b"), 1), (str(tmp_path / "b"), 2)], "split")
    for rank in (0, 1):
        first, resumed = split[rank]
        assert first == whole[rank][0][:2]
        assert resumed == whole[rank][0][2:], f"rank {rank} did not resume its own random stream"
