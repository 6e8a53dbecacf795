"""Fault tolerance with real processes: a SIGKILLed process resumes bit for bit, a killed Ray
worker costs at most one checkpoint interval, a SIGINTed driver resumes, nodes come and go."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import tb_events

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).with_name("ft_scripts.py")
SLOW = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def _wait_for(pred, timeout: float, what: str, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@SLOW
def test_sigkill_mid_epoch_resumes_bit_for_bit(cifar_small, tmp_path):
    """Run A straight through; run B is SIGKILLed right after its first mid-epoch checkpoint and
    started again with the same folder. B's per-epoch losses equal A's exactly."""
    over = [f"data.train={cifar_small['train']}", "data.val=", "ray.num_workers=1", "train.epochs=2",
            "train.max_steps_per_epoch=6", "train.checkpoint_every_steps=4", "data.train_subset=0"]
    a_out = tmp_path / "a.json"
    subprocess.run([sys.executable, str(SCRIPTS), "local", str(tmp_path / "a"), str(a_out), *over], check=True,
                   env=_env(), timeout=600)

    b_dir, b_out = tmp_path / "b", tmp_path / "b.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS), "local", str(b_dir), str(b_out), *over], env=_env())
    _wait_for(lambda: any(b_dir.glob("epoch_0000.*_step_*/state.pt")), 600, "the first mid-epoch checkpoint", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not b_out.exists()
    again = subprocess.run([sys.executable, str(SCRIPTS), "local", str(b_dir), str(b_out), *over], check=True,
                           env=_env(), timeout=600, capture_output=True, text=True)

    a = [m for m in json.loads(a_out.read_text()) if not m.get("partial")]
    b = [m for m in json.loads(b_out.read_text()) if not m.get("partial")]
    # The second process started from the checkpoint, not from scratch (which, being deterministic, would
    # give the same final loss): mid-epoch 1 after step 4, or epoch 2 if the kill came after epoch 1's.
    where = "epoch 1, batch 4" if len(b) == 2 else "epoch 2, batch 0"
    assert f"sslray: resumed at {where}" in again.stdout, again.stdout[-2000:]
    assert all(m["step"] > 4 for m in json.loads(b_out.read_text())), "the resumed run trained steps 1-4 again"
    assert [m["epoch"] for m in a] == [1, 2]
    assert [m["epoch"] for m in b] == [1, 2] or [m["epoch"] for m in b] == [2], b
    assert b[-1]["loss"] == a[-1]["loss"] and b[-1]["step"] == a[-1]["step"] == 12
    if len(b) == 2:  # the resumed epoch's health covers its steps before the kill too
        for k in ("grad_norm_backbone", "grad_norm_heads", "nonfinite_skipped_frac"):
            assert b[0][k] == pytest.approx(a[0][k], rel=1e-6), k


def test_nan_at_step_k_stops_cleanly_and_keeps_the_checkpoint(cifar_small, tmp_path, poison_loss):
    from sslray.config import load_config
    from sslray.raytrain.loop import NonFiniteLossError, run_local

    poison_loss(4)
    cfg = load_config("smoke", [f"data.train={cifar_small['train']}", "data.val=", "ray.num_workers=1",
                                "train.epochs=1", "train.max_steps_per_epoch=6", "train.checkpoint_every_steps=2"])
    with pytest.raises(NonFiniteLossError, match=r"at step 3 \(epoch 1\)"):
        run_local(cfg, str(tmp_path))
    kept = sorted(p.parent.name for p in tmp_path.glob("*/state.pt"))
    assert kept == ["epoch_0000.333333_step_0000002"]  # before the NaN, intact (2 of 6 steps)


def _worker_pids() -> list[int]:
    """Ray Train worker processes of this test session's Ray (descendants of this process), never
    another Ray instance's on the same machine."""
    import psutil

    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            text = " ".join(p.cmdline()) + " " + p.name()
        except psutil.Error:
            continue
        if "RayTrainWorker" in text:
            out.append(p.pid)
    return out


@pytest.mark.ray
@SLOW
def test_killed_worker_costs_at_most_one_checkpoint_interval(ray_cluster, cifar_small, tmp_path, capfd):
    from mlflow.tracking import MlflowClient

    from sslray.config import load_config
    from sslray.raytrain.trainer import pretrain

    interval = 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("smoke", [
        f"data.train={cifar_small['train']}", f"data.val={cifar_small['test']}", "data.train_subset=0",
        "train.epochs=2", "train.max_steps_per_epoch=6", f"train.checkpoint_every_steps={interval}",
        "train.report_every_steps=1", "ray.max_failures=2", f"ray.storage={tmp_path / 'runs'}", "ray.name=kill",
        f"tracking.tracking_uri={uri}", "tracking.experiment=ft"])
    run_dir = tmp_path / "runs" / "kill"
    killed = {}

    def killer():
        # After the first mid-epoch checkpoint, let one more step finish, then SIGKILL a worker.
        _wait_for(lambda: any(run_dir.glob("epoch_0000.*_step_*")), 600, "a checkpoint")
        before = set(_worker_pids())
        _wait_for(lambda: _step_entries(uri) >= interval + 1, 300, "a step past the checkpoint")
        pid = sorted(before)[-1]
        killed["pid"], killed["time"] = pid, time.time()
        os.kill(pid, signal.SIGKILL)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = pretrain(cfg)
    t.join(timeout=10)
    assert "pid" in killed, "the worker was never killed"
    assert res.metrics["epoch"] == 2 and res.metrics["step"] == 12

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("ft").experiment_id])
    assert len(runs) == 1, "a restart must not create a second MLflow run"
    epochs = sorted({m.step for m in c.get_metric_history(runs[0].info.run_id, "loss")})
    assert epochs == [1, 2]
    hist = sorted(c.get_metric_history(runs[0].info.run_id, "step_loss"), key=lambda m: m.timestamp)
    redone, seen_max = 0, 0
    for m in hist:
        if m.step <= seen_max:  # a step reported a second time: work done again after the restart
            redone += 1
        seen_max = max(seen_max, m.step)
    gaps = sorted(b.timestamp - a.timestamp for a, b in zip(hist, hist[1:]) if b.step == a.step + 1)
    step_s = gaps[len(gaps) // 2] / 1000 if gaps else float("nan")
    print(f"killed worker pid {killed['pid']}: redone {redone} step(s) ~ {redone * step_s:.1f} s "
          f"(median step {step_s:.2f} s; checkpoint interval {interval} steps)")
    assert redone <= interval
    assert max(m.timestamp for m in hist) / 1000 > killed["time"]  # training went on after the kill
    # ... in a restarted worker group that loaded a mid-epoch checkpoint (the kill hit a training worker;
    # the new rank 0's line reaches this process through Ray's log_to_driver).
    out = capfd.readouterr().out
    assert "sslray: resumed at epoch 1, batch" in out or "sslray: resumed at epoch 2, batch" in out, out[-3000:]


def _step_entries(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("ft")
    if exp is None:
        return 0
    runs = c.search_runs([exp.experiment_id])
    return len(c.get_metric_history(runs[0].info.run_id, "step_loss")) if runs else 0


@pytest.mark.ray
@SLOW
def test_sigint_driver_then_rerun_resumes(cifar_small, tmp_path):
    args = [sys.executable, "-m", "sslray.cli", "pretrain", "--recipe", "smoke", "--data", cifar_small["train"],
            "--val", cifar_small["test"], "--workers", "1", "--name", "intr", "--no-probe", "--storage",
            str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "train.epochs=3", "train.max_steps_per_epoch=3", "data.train_subset=0", "tracking.tensorboard=tb"]
    run_dir = tmp_path / "runs" / "intr"
    # Its own session: the SIGINT goes to the whole process group, as a terminal's Ctrl-C does (the
    # local Ray instance's workers get it too, and Ray's own handler aborts the run in the driver).
    proc = subprocess.Popen(args, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    _wait_for(lambda: any(run_dir.glob("epoch_0001*")), 600, "the first epoch checkpoint", proc)
    os.killpg(proc.pid, signal.SIGINT)
    out1, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "sslray: interrupted" in out1 and "failed" not in out1, out1[-3000:]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = c.search_runs([c.get_experiment_by_name("sslray").experiment_id])
    assert [r.info.status for r in first] == ["KILLED"]
    again = subprocess.run(args, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    text = again.stdout + again.stderr
    assert "resuming run intr" in text
    runs = c.search_runs([c.get_experiment_by_name("sslray").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(set(steps)) == [1, 2, 3]
    assert steps.count(1) == 1, "epoch 1 was trained again: the re-run started from scratch"
    # The TensorBoard mirror has the curve too, across the interrupted process and the one that resumed
    events = tb_events(tmp_path / "tb" / "intr")
    assert {s for s, _ in events["scalars"]["loss"]} == {1, 2, 3}
    assert "params" in events["texts"] and "config.yaml" in events["texts"]


@pytest.mark.ray
@SLOW
def test_multinode_cluster_matches_single_node_and_survives_node_loss(cifar_small, tmp_path):
    out = tmp_path / "mn.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS), "multinode", str(out), cifar_small["train"],
                           cifar_small["test"], str(tmp_path / "runs")], env=_env(), capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["num_nodes"] == {"STRICT_SPREAD": 2, "STRICT_PACK": 1}
    spread, pack = r["losses"]["STRICT_SPREAD"], r["losses"]["STRICT_PACK"]
    assert len(spread) == 2 and spread == pytest.approx(pack, rel=1e-5)
    assert r["node_loss"]["ok"], r["node_loss"]
    assert r["node_loss"]["final_epoch"] == 3
    # The node went while the run was going, and the run went on from a checkpoint (the only resume in
    # the script: the restarted rank 0's line, read from the workers' log files).
    assert r.get("node_removed_at", float("inf")) < r["node_loss"]["ended_at"], r
    assert r["node_loss"]["resumed"], proc.stdout[-3000:]


def test_unwritable_storage_fails_before_training(tmp_path):
    from sslray.raytrain.runfolder import StorageError, check_storage

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="a_file"):
        check_storage(str(blocker / "runs"), "x")
    assert check_storage(str(tmp_path / "ok"), "x").endswith("ok/x")


@pytest.mark.ray
@SLOW
def test_exhausted_max_failures_fails_clearly_and_keeps_the_checkpoint(ray_cluster, cifar_small, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from sslray.config import load_config
    from sslray.raytrain.trainer import pretrain

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("smoke", [
        f"data.train={cifar_small['train']}", "data.val=", "data.train_subset=0", "train.epochs=3",
        "train.max_steps_per_epoch=4", "train.checkpoint_every_steps=2", "ray.max_failures=0",
        f"ray.storage={tmp_path / 'runs'}", "ray.name=exhaust", f"tracking.tracking_uri={uri}",
        "tracking.experiment=ft-exhaust"])
    run_dir = tmp_path / "runs" / "exhaust"

    def killer():
        _wait_for(lambda: any(run_dir.glob("epoch_*/state.pt")), 600, "a checkpoint")
        os.kill(sorted(_worker_pids())[-1], signal.SIGKILL)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(Exception):
        pretrain(cfg)
    t.join(timeout=10)
    out = capsys.readouterr().out
    assert "failed (max_failures=0)" in out and str(run_dir) in out and "run the same command again" in out
    kept = list(run_dir.glob("epoch_*/state.pt"))
    assert kept, "the last checkpoint must survive the failure"
    import torch

    state = torch.load(kept[-1], weights_only=False)
    assert state["step"] >= 2 and "model" in state and "optimizer" in state
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("ft-exhaust").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
