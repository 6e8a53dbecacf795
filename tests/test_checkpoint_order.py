"""Checkpoint folder names sort in training order, also across a resume at another batch size.

Every reader finds the newest checkpoint by its folder name (``LocalSession.restore``, ``find_state``
for probe/eval/export, ``newest_file`` for remote runs). A resume at another batch renumbers the global
step, so the names cannot be keyed by it inside an epoch."""

from __future__ import annotations

import pytest
import torch

from sslray.raytrain.evaluate import find_state
from sslray.raytrain.loop import checkpoint_name
from sslray.raytrain.session import STATE_FILE, LocalSession
from sslray.storage import newest_file


def _mid(epoch: int, batch: int, steps_per_epoch: int) -> dict:
    """The step-level report the loop makes after ``batch`` steps of epoch ``epoch`` (0-based)."""
    return {"epoch": epoch, "step": epoch * steps_per_epoch + batch, "partial": 1,
            "batch_in_epoch": batch, "steps_per_epoch": steps_per_epoch}


def test_names_follow_training_order():
    names = [checkpoint_name({"epoch": 1}), checkpoint_name(_mid(1, 1, 8)), checkpoint_name(_mid(1, 7, 8)),
             checkpoint_name({"epoch": 2}), checkpoint_name(_mid(2, 1, 8)), checkpoint_name({"epoch": 10})]
    assert sorted(names) == names and len(set(names)) == len(names)
    assert checkpoint_name(_mid(0, 2, 6)) == "epoch_0000.333333_step_0000002"


@pytest.mark.parametrize("spe", [2, 3, 7, 1000, 999_983])
def test_consecutive_steps_of_an_epoch_never_share_a_name(spe):
    """The fraction in the name has six digits: distinct for every step up to a million steps per epoch."""
    names = [checkpoint_name(_mid(4, b, spe)) for b in range(max(1, spe - 50), spe)] + [checkpoint_name({"epoch": 5})]
    assert sorted(names) == names and len({n.split("_step_")[0] for n in names}) == len(names)


def test_the_resumed_runs_checkpoint_is_the_newest_after_a_resume_at_a_larger_batch(tmp_path):
    """A run at batch 16 (8 steps per epoch) saved a quarter into epoch 2 (global step 10) and crashed;
    resumed at batch 32 (4 steps per epoch) it saved half-way into epoch 2 (global step 6 in its
    numbering) and crashed again. Every reader must pick the half-way checkpoint."""
    session = LocalSession(str(tmp_path), "false", printer=lambda *a, **k: None)
    session.report(_mid(1, 2, 8), {"marker": "crashed run, 25%"})
    session.report(_mid(1, 2, 4), {"marker": "resumed run, 50%"})
    assert session.restore()["marker"] == "resumed run, 50%"
    newest = find_state(tmp_path)
    assert newest == tmp_path / checkpoint_name(_mid(1, 2, 4)) / STATE_FILE
    assert newest_file(str(tmp_path), STATE_FILE) == str(newest)
    assert torch.load(newest, weights_only=False)["marker"] == "resumed run, 50%"


def test_an_earlier_versions_mid_epoch_name_sorts_before_this_versions(tmp_path):
    """A run that crashed mid-epoch under the old ``epoch_0003_step_N`` names and went on after an
    upgrade writes ``epoch_0003.<fraction>_step_M`` from there: those are newer, though '_' > '.'."""
    from sslray.storage import checkpoint_order

    names = ["checkpoint_000009", "epoch_0002", "epoch_0002_step_0000900", "epoch_0002.250000_step_0000100",
             "epoch_0002.750000_step_0000300", "epoch_0003", "epoch_0012"]
    assert sorted(reversed(names), key=checkpoint_order) == names
    session = LocalSession(str(tmp_path), "false", printer=lambda *a, **k: None)
    for name in ("epoch_0002_step_0000900", "epoch_0002.250000_step_0000100"):
        (tmp_path / name).mkdir()
        torch.save({"marker": name}, tmp_path / name / STATE_FILE)
    assert session.restore()["marker"] == "epoch_0002.250000_step_0000100"
    assert find_state(tmp_path).parent.name == "epoch_0002.250000_step_0000100"
    assert newest_file(str(tmp_path), STATE_FILE).endswith("epoch_0002.250000_step_0000100/state.pt")


def test_a_newest_checkpoint_cut_short_is_passed_over_for_the_newest_whole_one(tmp_path, capsys):
    """A node lost while copying epoch 2's state.pt to shared storage leaves it cut short, and Ray never
    removes it: probe/eval/export of the run took it and failed. The newest whole checkpoint is used."""
    run = tmp_path / "run"
    for name in ("epoch_0001", "epoch_0002"):
        (run / name).mkdir(parents=True)
        torch.save({"epoch": int(name[-1])}, run / name / STATE_FILE)
    whole = (run / "epoch_0002" / STATE_FILE).read_bytes()
    (run / "epoch_0002" / STATE_FILE).write_bytes(whole[: len(whole) // 2])
    assert find_state(run) == run / "epoch_0001" / STATE_FILE
    assert "epoch_0002/state.pt is cut short" in capsys.readouterr().out
    (run / "epoch_0001" / STATE_FILE).write_bytes(b"")  # none whole: the newest, whose read names the file
    assert find_state(run) == run / "epoch_0002" / STATE_FILE


def test_a_local_session_keeps_the_newest_checkpoints_as_ray_does(tmp_path):
    """sslray.train_local kept every checkpoint (six 88 MB copies for two epochs with step checkpoints)
    where the same settings under Ray kept ray.num_to_keep; keep=0 (run_local's default) keeps all."""
    kept = LocalSession(str(tmp_path / "two"), "false", keep=2)
    every = LocalSession(str(tmp_path / "all"), "false")
    reports = [_mid(0, 2, 4), {"epoch": 1}, _mid(1, 2, 4), {"epoch": 2}]
    for s in (kept, every):
        for m in reports:
            s.report(m, {"name": checkpoint_name(m)})
    names = sorted(p.name for p in (tmp_path / "two").glob("epoch_*"))
    assert names == [checkpoint_name(_mid(1, 2, 4)), "epoch_0002"]
    assert len(list((tmp_path / "all").glob("epoch_*"))) == 4
    assert kept.restore()["name"] == "epoch_0002"  # the newest kept one is what a resume loads
