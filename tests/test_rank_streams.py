"""Two gloo processes run the real loop on CIFAR-10: each rank draws its own views (and masks, crops),
a run resumed mid-epoch continues every rank's stream and epoch sums, and the kNN monitor scores each
val image once.

With one random stream shared by every rank, image i of each worker's shard got the same crop, jitter
and mask, so a global batch held batch/workers independent draws.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

pytestmark = pytest.mark.slow  # two spawned processes running the loop


def _rank_main(rank: int, world: int, init: str, out: str, cfg_dict: dict, ckpt: str):
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
    real_views, real_knn = L.build_views, L.knn_accuracy
    L.build_views = lambda vc: made.append(Recorder(real_views(vc))) or made[-1]
    scored: list = []
    L.knn_accuracy = lambda vf, vy, bf, by, *a: scored.append((len(vf), len(bf))) or real_knn(vf, vy, bf, by, *a)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        session = LocalSession(ckpt, "cpu", printer=lambda *a, **k: None)
        L.train_loop(from_dict(cfg_dict), session)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"views": made[0].states, "scored": scored, "history": session.history}, f)
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, cfg, ckpt, tag):
    import torch.multiprocessing as mp

    out = str(tmp_path / tag)
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / ('rdv-' + tag)}", out, cfg.to_dict(), str(ckpt)), nprocs=2,
             join=True)
    return [json.loads(open(f"{out}.{r}").read()) for r in range(2)]


def test_ranks_draw_their_own_views_and_resume_them(cifar_small, tmp_path):
    from sslray.config import load_config

    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}",
                                "data.val_subset=101", "data.knn_bank=255", "ray.num_workers=2", "train.epochs=1",
                                "train.max_steps_per_epoch=3", "train.checkpoint_every_steps=2",
                                "train.online_probe=true", "monitor.collapse=false"])
    whole = _spawn(tmp_path, cfg, tmp_path / "whole", "whole")
    r0, r1 = whole[0]["views"], whole[1]["views"]
    assert len(r0) == len(r1) == 3
    assert not set(r0) & set(r1), "rank 1 drew its views from the same random stream as rank 0"
    assert len(set(r0)) == 3, "rank 0's stream did not move between steps"
    # 101 val and 255 bank images over 2 ranks: each scored once, none repeated to pad a shard.
    assert whole[0]["scored"] == [[101, 255]]

    # Resume from the mid-epoch checkpoint (after step 2): step 3 draws what the whole run drew on each
    # rank, and the epoch's figures (loss and online-probe sums over both ranks) are the whole run's.
    mid = next((tmp_path / "whole").glob("epoch_0000.*_step_0000002"))
    shutil.copytree(mid, tmp_path / "resumed" / mid.name)
    resumed = _spawn(tmp_path, cfg, tmp_path / "resumed", "resumed")
    for rank in (0, 1):
        assert resumed[rank]["views"] == whole[rank]["views"][2:], f"rank {rank} did not resume its own stream"
    end_whole, end_resumed = whole[0]["history"][-1], resumed[0]["history"][-1]
    for key in ("loss", "online_probe_train_top1", "online_probe_train_loss", "online_probe_top1", "knn_top1"):
        assert end_resumed[key] == pytest.approx(end_whole[key], rel=1e-5, abs=1e-6), key
