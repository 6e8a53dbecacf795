"""`--no-baseline`, `--knn-temperature` and `--linear-c` of `sslray eval`, `sslray probe` and `sslray pretrain`.

Fast synthetic checks of the C selection (features built so that a small or a large C is clearly best,
and val kept out of the choice), of the kNN temperatures and of the baseline-free tables and summaries;
then the commands on a tiny checkpoint of real CIFAR-10 subsets, counting feature passes and fits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import count_work, tiny_checkpoint
from sslray.eval import features as F
from sslray.eval import run_eval  # before any test patches F.FeatureStore: the runner binds it on import
from sslray.eval.features import Features
from sslray.raytrain import probe as probe_mod

SUBSETS = {"train_subset": 200, "val_subset": 100}
TINY, HUGE = 1e-4, 100.0


def _quiet(*_a, **_k):
    pass


def noisy(seed: int, n: int = 1000, d: int = 500, mu: float = 0.04):
    """Two classes a weak mean shift apart in every one of ``d`` noisy dimensions, about 2 images per
    dimension: a weakly regularised probe fits the noise, a strongly regularised one the class means."""
    r = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return (r.normal(size=(n, d)) + np.where(y[:, None] == 1, mu, -mu)).astype(np.float32), y


def correlated(seed: int, n: int = 600):
    """Three classes told apart only by x0 - x1: their means differ along x0 alone, where a shared noise
    10x the class gap hides them, so a strongly regularised probe (weights along the class means) is near
    chance and a weakly regularised one subtracts the noise and is exact."""
    r = np.random.default_rng(seed)
    y = np.arange(n) % 3
    z = r.normal(scale=10, size=n)
    return np.stack([y + z, z, r.normal(size=n), r.normal(size=n)], 1).astype(np.float32), y


def _names(y) -> list[str]:
    return [f"c{i}" for i in range(int(y.max()) + 1)]


# --- C chosen on held-out train features ---------------------------------------------------------------

def test_holdout_split_is_stratified_seeded_and_keeps_single_image_classes():
    y = np.array([0] * 50 + [1] * 20 + [2] * 1 + [3] * 2)
    fit, held = probe_mod.holdout_split(y, seed=4)
    assert np.bincount(y[held], minlength=4).tolist() == [5, 2, 0, 1]  # 10% per class, a lone image stays
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(len(y)))
    assert np.array_equal(held, probe_mod.holdout_split(y, seed=4)[1])
    assert not np.array_equal(held, probe_mod.holdout_split(y, seed=5)[1])
    with pytest.raises(probe_mod.HoldoutError):
        probe_mod.holdout_split(np.arange(5), seed=0)  # one image per class: nothing to hold out


@pytest.mark.parametrize("make, best", [(noisy, TINY), (correlated, HUGE)], ids=["small-C", "large-C"])
def test_the_c_best_on_held_out_train_features_is_chosen(make, best):
    tx, ty = make(0)
    vx, vy = make(100)
    res = probe_mod.fit_linear_probe(tx, ty, vx, vy, _names(ty), cs=[HUGE, 1.0, TINY], seed=0)
    other = HUGE if best == TINY else TINY
    assert res.C == best and set(res.c_scores) == {TINY, 1.0, HUGE}
    assert res.c_scores[best] == max(res.c_scores.values()) > res.c_scores[other]
    # the choice holds on val too, and the refit on all train features is the plain probe with that C
    plain = {c: probe_mod.linear_probe(tx, ty, vx, vy, _names(ty), C=c).metrics["top1"] for c in (best, other)}
    assert plain[best] > plain[other] and res.metrics["top1"] == plain[best]


def test_choosing_c_never_reads_the_val_split(monkeypatch):
    tx, ty = correlated(1)
    vx, vy = correlated(101)
    calls, real = [], probe_mod.linear_probe

    def spy(train_x, train_y, val_x, val_y, names, C=1.0, **kw):
        calls.append((train_x, val_x, C))
        return real(train_x, train_y, val_x, val_y, names, C=C, **kw)

    monkeypatch.setattr(probe_mod, "linear_probe", spy)
    res = probe_mod.fit_linear_probe(tx, ty, vx, vy, _names(ty), cs=(TINY, 1.0, HUGE), seed=3)
    *choice, last = calls
    assert len(choice) == 3 and all(v is not vx and len(t) + len(v) == len(tx) for t, v, _ in choice)
    assert last[0] is tx and last[1] is vx and last[2] == res.C  # val scores the chosen probe, once
    # other val images and labels: the same choice and held-out scores
    rng = np.random.default_rng(0)
    again = probe_mod.fit_linear_probe(tx, ty, vx[::-1].copy(), rng.permutation(vy), _names(ty), cs=(TINY, 1.0, HUGE),
                                       seed=3)
    assert (again.C, again.c_scores) == (res.C, res.c_scores)


def test_one_c_is_todays_probe_exactly():
    tx, ty = noisy(2, n=200, d=20)
    vx, vy = noisy(3, n=100, d=20)
    default = probe_mod.fit_linear_probe(tx, ty, vx, vy, ["a", "b"], seed=7)
    before = probe_mod.linear_probe(tx, ty, vx, vy, ["a", "b"], seed=7)
    assert default.metrics == before.metrics and default.report == before.report and default.C == 1.0
    assert np.array_equal(default.confusion, before.confusion) and default.c_scores == {}
    assert probe_mod.linear_cs("0.1,1,0.1".split(",")) == (0.1, 1.0)
    for bad in ([], [0.0], [-1.0], ["x"], [float("nan")]):
        with pytest.raises(ValueError, match="--linear-c needs positive numbers"):
            probe_mod.linear_cs(bad)


def _store(train_x, train_y, val_x, val_y, T=0.07):
    """What the scikit-learn protocols read of a FeatureStore, around fixed features (both inits alike)."""
    f = Features(train_x, train_y, val_x, val_y, _names(train_y), "pretrained", None, False)
    return SimpleNamespace(get=lambda init: f, progress=False, fitted=lambda *a: False,
                           cfg=SimpleNamespace(train=SimpleNamespace(knn_temperature=T, seed=0)))


def test_lowshot_chooses_c_per_subset_and_falls_back_on_one_image_per_class():
    from sslray.eval.protocols import PROTOCOLS, EvalContext

    tx, ty = correlated(4, n=300)
    vx, vy = correlated(104, n=150)
    ctx = EvalContext(_store(tx, ty, vx, vy), lowshot_fractions=(0.01, 0.5), lowshot_seeds=(0, 1),
                      linear_c=(TINY, HUGE), baseline=False, log=_quiet)
    r = PROTOCOLS.get("lowshot")(ctx)
    # 1% is 1 image per class: nothing to hold out, the C chosen on all train features; 50%: its own choice
    assert r.info["linear_c"] == {f"pretrained_{f}_seed{s}": HUGE for f in ("1pct", "50pct") for s in (0, 1)}
    assert r.random_init == {} and r.gain() == {}
    assert r.pretrained["lowshot_50pct_top1_mean"] == pytest.approx(1.0)
    # one C: the numbers of the plain probe, no C in the info
    one = PROTOCOLS.get("lowshot")(EvalContext(_store(tx, ty, vx, vy), lowshot_fractions=(0.5,), lowshot_seeds=(0,),
                                                baseline=False, log=_quiet))
    from sslray.eval import stratified_indices

    idx = stratified_indices(ty, 0.5, 0)
    want = probe_mod.linear_probe(tx[idx], ty[idx], vx, vy, _names(ty), seed=0).metrics["top1"]
    assert one.pretrained["lowshot_50pct_top1_mean"] == want and "linear_c" not in one.info


# --- kNN temperatures -------------------------------------------------------------------------------------

def test_every_knn_temperature_is_scored_on_the_same_features():
    """The query's nearest neighbour is of its class, the 3 next ones (a little further) of another: a
    small T follows the nearest, a large T the majority."""
    from sslray.eval.protocols import PROTOCOLS, EvalContext
    from sslray.raytrain.knn import knn_accuracy

    def at(cos):
        return [cos, math.sqrt(1 - cos**2)]

    bank = np.array([at(0.99), at(0.9), at(0.9), at(0.9)], np.float32)
    bank_y = np.array([0, 1, 1, 1])
    q, qy = np.array([[1.0, 0.0]], np.float32), np.array([0])
    store = _store(bank, bank_y, q, qy, T=0.5)
    r = PROTOCOLS.get("knn")(EvalContext(store, knn_ks=(1, 4), knn_temperature=[0.01, 1.0], baseline=False, log=_quiet))
    assert r.pretrained["knn_k4_t0.01_top1"] == 1.0 and r.pretrained["knn_k4_t1_top1"] == 0.0
    assert r.pretrained["knn_k1_t0.01_top1"] == r.pretrained["knn_k1_t1_top1"] == 1.0
    assert set(r.pretrained) == {f"knn_k{k}_t{t}_top{n}" for k in (1, 4) for t in ("0.01", "1") for n in (1, 5)}
    assert r.info["temperature"] == [0.01, 1.0]
    for t in (0.01, 1.0):
        want = knn_accuracy(*map(torch.from_numpy, (q, qy, bank, bank_y)), 2, 4, t)["knn_top1"]
        assert r.pretrained[f"knn_k4_t{t:g}_top1"] == want
    # one T, given or the checkpoint's: the names it always had
    for t in (None, 0.5, [0.5]):
        one = PROTOCOLS.get("knn")(EvalContext(store, knn_ks=(4,), knn_temperature=t, baseline=False, log=_quiet))
        assert set(one.pretrained) == {"knn_k4_top1", "knn_k4_top5"} and one.info["temperature"] == 0.5


@pytest.mark.parametrize("flags, message", [
    (["--protocol", "knn", "--knn-temperature", "0.1,0"], "--knn-temperature (knn_temperature) needs temperatures "
                                                         "above 0, got [0.1, 0.0]"),
    (["--protocol", "knn", "--knn-temperature", "hot"], "--knn-temperature 'hot': expected a comma list of floats"),
    (["--protocol", "linear", "--linear-c", "0.1,0"], "--linear-c (linear_c) needs positive numbers, got [0.1, 0.0]"),
    (["--protocol", "lowshot", "--linear-c", "-1"], "--linear-c (linear_c) needs positive numbers, got [-1.0]"),
], ids=["knn-t-zero", "knn-t-text", "linear-c-zero", "lowshot-c-negative"])
def test_new_eval_options_are_checked_before_any_work(flags, message, tmp_path, capsys, monkeypatch):
    from sslray.cli import main

    monkeypatch.setattr(F, "FeatureStore", lambda *a, **k: pytest.fail("the checkpoint was opened first"))
    assert main(["eval", "--checkpoint", str(tmp_path), "--no-log", *flags]) == 2
    assert message in capsys.readouterr().err


def test_probe_and_pretrain_check_linear_c_first_and_pass_their_flags(tmp_path, capsys, monkeypatch):
    from sslray import cli

    monkeypatch.setattr(F, "FeatureStore", lambda *a, **k: pytest.fail("the checkpoint was opened first"))
    argv = ["--checkpoint", str(tmp_path), "--train", "t.beton", "--val", "v.beton"]
    assert cli.main(["probe", *argv, "--linear-c", "0"]) == 2
    assert "--linear-c needs positive numbers, got [0.0]" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(cli, "run_pretrain", lambda cfg, **kw: seen.update(kw))
    assert cli.main(["pretrain", "--recipe", "smoke", "--no-baseline", "--linear-c", "10,0.1", "--eval", "linear"]) == 0
    assert seen["baseline"] is False and seen["linear_c"] == (0.1, 10.0) and seen["eval_protocols"] == "linear"
    assert cli.main(["pretrain", "--recipe", "smoke"]) == 0
    assert seen["baseline"] is True and seen["linear_c"] == (1.0,)


# --- no baseline: results, table, summary -----------------------------------------------------------------

def test_a_report_without_baseline_has_no_random_init_gain_or_nan():
    from sslray.eval import EvalReport, ProtocolResult, format_eval_table

    lin = ProtocolResult("linear", {"linear_top1": 0.4, "linear_c": 0.1}, {})
    rep = EvalReport("/r/epoch_1/state.pt", [lin])
    assert rep.metrics() == {"eval_linear_top1": 0.4, "eval_linear_c": 0.1}
    entry = rep.summary()["protocols"]["linear"]
    assert "random_init" not in entry and "gain" not in entry and "skipped" in entry["baseline"]
    md = format_eval_table(rep, markdown=True)
    assert md.startswith("| metric | pretrained |")
    assert "| linear_top1 | 40.00% |" in md and "| linear_c | C=0.1 |" in md
    assert "baseline skipped (--no-baseline)" in md and "nan" not in md.lower()
    assert "baseline skipped" in format_eval_table(rep)
    # beside a protocol with its baseline (a summary merged over two calls): that row says skipped
    knn = ProtocolResult("knn", {"knn_k20_top1": 0.3}, {"knn_k20_top1": 0.1})
    both = format_eval_table(EvalReport("/r/state.pt", [knn, lin]), markdown=True)
    assert "| knn_k20_top1 | 10.00% | 30.00% | +20.00 pts |" in both and "| linear_top1 | skipped | 40.00% |  |" in both


def test_finetune_without_baseline_fits_the_pretrained_backbone_only(monkeypatch):
    from sslray.eval.protocols import PROTOCOLS, EvalContext
    from sslray.raytrain import finetune

    fits = []

    def run(state_path, train, val, init, s):
        fits.append(init)
        return {"top1": 0.5, "top5": 0.9, "macro_f1": 0.4, "step": 2, "val_images": 30}

    monkeypatch.setattr(finetune, "run_finetune", run)
    monkeypatch.setattr(finetune, "finetune_compare", lambda *a, **k: pytest.fail("the random init was fine-tuned"))
    store = SimpleNamespace(state_path=Path("/runs/r/state.pt"), train="/data/train", val="/data/val")
    r = PROTOCOLS.get("finetune")(EvalContext(store=store, baseline=False, log=_quiet))
    assert fits == ["pretrained"] and r.random_init == {} and r.gain() == {}
    assert r.pretrained == {"finetune_top1": 0.5, "finetune_top5": 0.9, "finetune_macro_f1": 0.4}
    assert r.info["pretrained"]["step"] == 2 and "random_init" not in r.info


# --- the commands on a tiny checkpoint of real CIFAR-10 subsets -------------------------------------------

@pytest.fixture(scope="module")
def ckpt(cifar_small, tmp_path_factory) -> dict:
    return tiny_checkpoint(cifar_small, tmp_path_factory.mktemp("evalopt_ckpt"), "evalopt")


def _logged(uri: str, run_id: str, tmp_path: Path) -> tuple[dict, dict, str]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    metrics = c.get_run(run_id).data.metrics
    if not any(a.path == "eval" for a in c.list_artifacts(run_id)):
        return metrics, {}, ""
    summary = json.loads(Path(c.download_artifacts(run_id, "eval/summary.json", str(tmp_path))).read_text())
    return metrics, summary, Path(c.download_artifacts(run_id, "eval/summary.md", str(tmp_path))).read_text()


def _no_baseline_metrics(metrics: dict) -> None:
    assert metrics and not [k for k in metrics if "random_init" in k or "gain" in k]
    assert all(math.isfinite(v) for v in metrics.values())


def test_cli_eval_no_baseline_extracts_and_logs_the_pretrained_side_only(ckpt, tmp_path, capsys, monkeypatch):
    from sslray.cli import main
    from sslray.tracking import Tracker

    run = Tracker.start(ckpt["uri"], "evalopt", "eval-no-baseline")
    calls = count_work(monkeypatch)
    assert main(["eval", "--checkpoint", str(ckpt["state"]), "--train", ckpt["train"], "--val", ckpt["val"],
                 "--protocol", "linear,knn", "--knn-k", "10", "--no-baseline", "--no-cache", "--gpu", "false",
                 "--train-subset", "200", "--val-subset", "100", "--run-id", run.run_id,
                 "--tracking-uri", ckpt["uri"]]) == 0
    assert calls == {"extract": 2, "fit": 1}  # train + val of the pretrained backbone, one probe
    out = capsys.readouterr().out
    assert "baseline skipped" in out and "random init" not in out and "knn_k10_top1" in out
    metrics, summary, table = _logged(ckpt["uri"], run.run_id, tmp_path)
    _no_baseline_metrics(metrics)
    assert {"eval_linear_top1", "eval_knn_k10_top1"} <= set(metrics) and "eval_linear_c" not in metrics
    for entry in summary["protocols"].values():
        assert set(entry) == {"checkpoint", "pretrained", "baseline", "info"}
    assert list(summary["features"]) == ["pretrained"]
    assert "baseline skipped" in table and "nan" not in table.lower()


def test_cli_probe_no_baseline_logs_no_random_init(ckpt, tmp_path, capsys, monkeypatch):
    from sslray.cli import main
    from sslray.tracking import Tracker

    run = Tracker.start(ckpt["uri"], "evalopt", "probe-no-baseline")
    calls = count_work(monkeypatch)
    assert main(["probe", "--checkpoint", str(ckpt["state"]), "--train", ckpt["train"], "--val", ckpt["val"],
                 "--no-baseline", "--gpu", "false", "--train-subset", "200", "--val-subset", "100", "-k", "10",
                 "--run-id", run.run_id, "--tracking-uri", ckpt["uri"]]) == 0
    assert calls == {"extract": 2, "fit": 1}
    out = capsys.readouterr().out
    assert "baseline skipped" in out and "nan" not in out.lower()
    metrics, _, _ = _logged(ckpt["uri"], run.run_id, tmp_path)
    _no_baseline_metrics(metrics)
    assert {"probe_linear_top1", "probe_knn_top1"} <= set(metrics)


@pytest.mark.slow  # low-shot probes on 7 subsets, each choosing its C: ~10 s on 2 busy cores
def test_pretrain_no_baseline_and_linear_c_share_one_choice(ckpt, tmp_path, monkeypatch):
    """`sslray pretrain --no-baseline --linear-c 0.01,1 --eval linear,lowshot` (training stubbed): the probe
    and the linear protocol read one fit with one chosen C; nothing of a random init is made or logged."""
    from sslray.cli import run_pretrain
    from sslray.config import load_config
    from sslray.raytrain import trainer
    from sslray.tracking import Tracker

    run = Tracker.start(ckpt["uri"], "evalopt", "pretrain-no-baseline")
    res = trainer.PretrainResult(run.run_id, ckpt["uri"], str(ckpt["state"].parent), {}, "tiny", "")
    monkeypatch.setattr(trainer, "pretrain", lambda cfg, restart=False: res)
    cfg = load_config("smoke", [f"data.train={ckpt['train']}", f"data.val={ckpt['val']}", "ray.use_gpu=false",
                                "train.export_backbone=false"])
    calls = count_work(monkeypatch)
    out = run_pretrain(cfg, probe=True, probe_train_subset=100, probe_val_subset=50, eval_protocols="linear,lowshot",
                       baseline=False, linear_c=(0.01, 1.0))
    # one store: 2 feature passes; 2 held-out fits + 1 refit, shared by the probe and the linear protocol
    assert calls["extract"] == 2 and out.probe.random_init == {} and out.probe.random_probe is None
    lowshot_fits = calls["fit"] - 3
    assert lowshot_fits >= 3 * 3  # 1% (fallback: plain fits), 10%, 100% subsets, each a choice or a fit
    metrics, summary, table = _logged(ckpt["uri"], run.run_id, tmp_path)
    _no_baseline_metrics(metrics)
    assert metrics["probe_linear_c"] == metrics["eval_linear_c"] == out.probe.probe.C in (0.01, 1.0)
    assert metrics["probe_linear_top1"] == metrics["eval_linear_top1"]
    info = summary["protocols"]["linear"]["info"]
    assert set(info["linear_c_heldout_top1_pretrained"]) == {"0.01", "1"} and info["linear_c"] == [0.01, 1.0]
    assert set(summary["protocols"]["lowshot"]["info"]["linear_c"]) == {
        f"pretrained_{f}_seed{s}" for f in ("1pct", "10pct") for s in (0, 1, 2)} | {"pretrained_100pct_seed0"}
    assert "| linear_c | C=" in table and "baseline skipped" in table


def test_store_linear_fits_are_cached_per_c_setting(ckpt, monkeypatch):
    store = F.FeatureStore(str(ckpt["state"]), ckpt["train"], ckpt["val"], use_gpu="false", cache=False,
                           progress=False, log=_quiet, **SUBSETS)
    default = store.linear("pretrained")
    f = store.get("pretrained")
    before = probe_mod.linear_probe(f.train_x, f.train_y, f.val_x, f.val_y, f.classes, seed=store.cfg.train.seed)
    assert default.metrics == before.metrics and default.report == before.report  # today's probe, exactly
    chosen = store.linear("pretrained", (1.0, 0.01))
    assert chosen is not default and chosen.c_scores and store.fitted("pretrained", [0.01, 1.0])
    assert not store.fitted("pretrained", (0.1,))
    monkeypatch.setattr(probe_mod, "linear_probe", lambda *a, **k: pytest.fail("fitted again"))
    assert store.linear("pretrained", [0.01, 1.0]) is chosen and store.linear("pretrained", 1.0) is default


def test_eval_knn_temperatures_on_real_features(ckpt):
    def knn(t):
        rep = run_eval(str(ckpt["state"]), ckpt["train"], ckpt["val"], "knn", use_gpu="false", cache=False,
                       progress=False, log=_quiet, knn_ks=(20,), knn_temperature=t, baseline=False, **SUBSETS)
        return rep.results[0].pretrained

    default, several = knn(None), knn([0.07, 0.01, 1.0])
    assert set(default) == {"knn_k20_top1", "knn_k20_top5"}  # the checkpoint's T: names unchanged
    assert default["knn_k20_top1"] == several["knn_k20_t0.07_top1"]  # the smoke recipe's T is 0.07
    assert {f"knn_k20_t{t}_top1" for t in ("0.07", "0.01", "1")} <= set(several)
