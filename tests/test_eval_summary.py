"""`sslray eval` called twice on one MLflow run: the run's `eval/summary.json`, `eval/summary.md` and
`sslray.eval_protocols` tag hold the protocols of both calls. Each call used to overwrite them with its
own protocols only, so `--protocol linear` after `--protocol linear,knn,lowshot,embed` erased the other
three from the summary while their metrics stayed on the run. Fast tier: the protocols' results are
built by hand (their numbers are tested in tests/test_eval_protocols.py); the logging is real MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sslray.eval import EvalReport, ProtocolResult, log_eval
from sslray.tracking import Tracker


def _result(name: str, pretrained: dict, random_init: dict, **info) -> ProtocolResult:
    return ProtocolResult(name, pretrained, random_init, info=info)


def _report(checkpoint: str, *results: ProtocolResult) -> EvalReport:
    return EvalReport(checkpoint, list(results), {"pretrained": {"path": None, "from_cache": False}})


FULL = (  # `--protocol linear,knn,lowshot,embed`
    _result("linear", {"linear_top1": 0.40, "linear_macro_f1": 0.38}, {"linear_top1": 0.20, "linear_macro_f1": 0.18},
            train_images=1000),
    _result("knn", {"knn_k20_top1": 0.35, "knn_k20_top5": 0.80}, {"knn_k20_top1": 0.15, "knn_k20_top5": 0.55}, ks=[20]),
    _result("lowshot", {"lowshot_10pct_top1_mean": 0.30, "lowshot_10pct_top1_std": 0.02, "lowshot_10pct_runs": 3},
            {"lowshot_10pct_top1_mean": 0.12, "lowshot_10pct_top1_std": 0.01, "lowshot_10pct_runs": 3}),
    _result("embed", {"embed_silhouette": 0.05}, {"embed_silhouette": -0.02}),
)
LINEAR_AGAIN = _result("linear", {"linear_top1": 0.45, "linear_macro_f1": 0.44},
                       {"linear_top1": 0.21, "linear_macro_f1": 0.19}, train_images=500)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one takes seconds); each test gets its own run in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('eval_summary') / 'mlflow.db'}"


@pytest.fixture
def run(store) -> Tracker:
    return Tracker.start(store, "eval-summary", "tiny")


def _logged(run: Tracker, tmp_path: Path) -> tuple[dict, str, str]:
    """The run's summary.json, summary.md and protocols tag, as MLflow holds them."""
    c = run.client
    out = tmp_path / f"dl{len(list(tmp_path.glob('dl*')))}"
    out.mkdir()
    summary = json.loads(Path(c.download_artifacts(run.run_id, "eval/summary.json", str(out))).read_text())
    table = Path(c.download_artifacts(run.run_id, "eval/summary.md", str(out))).read_text()
    return summary, table, c.get_run(run.run_id).data.tags["sslray.eval_protocols"]


def test_a_narrower_later_call_keeps_the_earlier_protocols_in_the_summary_and_tag(run, tmp_path):
    log_eval(run, _report("/runs/r/epoch_0010/state.pt", *FULL))
    summary, table, tag = _logged(run, tmp_path)
    assert set(summary["protocols"]) == set(tag.split(",")) == {"linear", "knn", "lowshot", "embed"}

    log_eval(run, _report("/runs/r/epoch_0020/state.pt", LINEAR_AGAIN))  # `--protocol linear`
    summary, table, tag = _logged(run, tmp_path)
    assert tag == "embed,knn,linear,lowshot"  # the union, sorted
    p = summary["protocols"]
    assert list(p) == sorted(p)
    assert set(p) == {"linear", "knn", "lowshot", "embed"}
    # the protocol run again is replaced by this call's entry; the others are kept as they were
    assert p["linear"]["pretrained"] == LINEAR_AGAIN.pretrained and p["linear"]["info"] == {"train_images": 500}
    assert p["linear"]["gain"]["linear_top1"] == pytest.approx(0.45 - 0.21)
    assert p["linear"]["checkpoint"] == "/runs/r/epoch_0020/state.pt" == summary["checkpoint"]
    assert p["knn"]["pretrained"] == FULL[1].pretrained and p["knn"]["info"] == {"ks": [20]}
    assert p["knn"]["checkpoint"] == "/runs/r/epoch_0010/state.pt"
    assert p["lowshot"]["random_init"] == FULL[2].random_init and p["embed"]["pretrained"] == FULL[3].pretrained
    # the Markdown table shows every protocol's rows, linear with this call's numbers
    for row in ("| linear_top1 | 21.00% | 45.00% | +24.00 pts |", "| knn_k20_top1 | 15.00% | 35.00% | +20.00 pts |",
                "| lowshot_10pct_top1 | 12.00 ± 1.00% | 30.00 ± 2.00% | +18.00 pts |",
                "| embed_silhouette | -0.020 | 0.050 | +0.070 |"):
        assert row in table, table
    assert "40.00%" not in table  # the replaced linear numbers are gone
    # the metrics of every call stay on the run (unchanged behaviour)
    m = run.client.get_run(run.run_id).data.metrics
    assert m["eval_linear_top1"] == 0.45 and m["eval_knn_k20_top1"] == 0.35


def test_the_first_call_on_a_run_writes_its_own_protocols_only(run, tmp_path):
    log_eval(run, _report("/ck/state.pt", FULL[1], FULL[0]))  # `--protocol knn,linear`
    summary, table, tag = _logged(run, tmp_path)
    assert tag == "knn,linear" and list(summary["protocols"]) == ["knn", "linear"]
    assert summary["checkpoint"] == "/ck/state.pt" and summary["features"]["pretrained"]["from_cache"] is False
    assert "lowshot" not in table and "embed" not in table


def test_an_unreadable_summary_on_the_run_is_replaced_with_a_warning(run, tmp_path, capsys):
    run.client.log_text(run.run_id, "not json {", "eval/summary.json")
    run.set_tags({"sslray.eval_protocols": "knn"})
    log_eval(run, _report("/ck/state.pt", LINEAR_AGAIN))
    summary, _, tag = _logged(run, tmp_path)
    assert list(summary["protocols"]) == ["linear"] and tag == "knn,linear"  # knn's metrics are on the run
    assert "eval/summary.json could not be read" in capsys.readouterr().err


def test_cli_eval_twice_on_one_run_merges(run, tmp_path, monkeypatch, capsys):
    """The same through `sslray eval --run-id` (the protocols stubbed: each call returns its results)."""
    from sslray.cli import main
    from sslray.eval import runner

    by_name = {r.name: r for r in FULL}
    monkeypatch.setattr(runner, "run_eval", lambda ckpt, train, val, names, **k: _report(
        ckpt, *(LINEAR_AGAIN if n == "linear" and len(names) == 1 else by_name[n] for n in names)))
    argv = ["eval", "--checkpoint", str(tmp_path / "ck"), "--run-id", run.run_id, "--tracking-uri", run.uri]
    assert main([*argv, "--protocol", "linear,knn,lowshot,embed"]) == 0
    assert main([*argv, "--protocol", "linear"]) == 0
    assert capsys.readouterr().out.count(f"logged to MLflow run {run.run_id}") == 2
    summary, table, tag = _logged(run, tmp_path)
    assert tag == "embed,knn,linear,lowshot" and set(summary["protocols"]) == {"linear", "knn", "lowshot", "embed"}
    assert summary["protocols"]["linear"]["pretrained"]["linear_top1"] == 0.45
    assert "knn_k20_top1" in table and "lowshot_10pct_top1" in table


def test_a_protocol_run_again_without_its_baseline_clears_the_earlier_baseline_metrics(run, tmp_path):
    """`sslray eval --protocol linear,knn` then `--protocol linear --no-baseline` on one run: the run kept the
    first call's eval_random_init_linear_* and eval_gain_linear_* beside the second call's pretrained score."""
    log_eval(run, _report("/ck/state.pt", FULL[0], FULL[1]))
    again = _result("linear", {"linear_top1": 0.47}, {})  # no baseline, and no macro F1 this time
    log_eval(run, _report("/ck/state.pt", again))
    m = run.client.get_run(run.run_id).data.metrics
    assert m["eval_linear_top1"] == 0.47
    cleared = ("eval_random_init_linear_top1", "eval_gain_linear_top1", "eval_linear_macro_f1",
               "eval_random_init_linear_macro_f1", "eval_gain_linear_macro_f1")
    assert all(math.isnan(m[k]) for k in cleared), {k: m[k] for k in cleared}
    # the protocol not run again keeps its baseline, and the history keeps the cleared values
    assert (m["eval_random_init_knn_k20_top1"], m["eval_gain_knn_k20_top1"]) == (0.15, pytest.approx(0.20))
    history = run.client.get_metric_history(run.run_id, "eval_gain_linear_top1")
    assert [h.value for h in history][0] == pytest.approx(0.20) and math.isnan(history[-1].value)
    summary, table, _ = _logged(run, tmp_path)
    assert summary["protocols"]["linear"]["baseline"].startswith("random-init baseline skipped")
    log_eval(run, _report("/ck/state.pt", LINEAR_AGAIN))  # with its baseline again: numbers, not NaN
    m = run.client.get_run(run.run_id).data.metrics
    assert m["eval_gain_linear_top1"] == pytest.approx(0.24) and m["eval_random_init_linear_macro_f1"] == 0.19


def test_a_probe_without_its_baseline_clears_an_earlier_probes_baseline(run):
    from types import SimpleNamespace

    import numpy as np

    from sslray.raytrain import evaluate

    def report(pre, rnd):
        probe = SimpleNamespace(converged=True, report="r", confusion=np.eye(2, dtype=int))
        return SimpleNamespace(pretrained=pre, random_init=rnd, probe=probe, classes=["a", "b"], pictures={})

    evaluate.log_probe(run, report({"linear_top1": 0.6, "knn_top1": 0.5, "linear_c": 0.1},  # `--linear-c 0.1,1`
                                   {"linear_top1": 0.3, "knn_top1": 0.2, "linear_c": 1.0}))
    run.log_metrics({"knn_top1": 0.55})  # the training loop's own monitor metric is not the probe's to clear
    evaluate.log_probe(run, report({"linear_top1": 0.62, "knn_top1": 0.51}, {}))  # `--no-baseline`
    m = run.client.get_run(run.run_id).data.metrics
    assert (m["probe_linear_top1"], m["probe_knn_top1"], m["knn_top1"]) == (0.62, 0.51, 0.55)
    assert all(math.isnan(m[f"{p}_{k}"]) for p in ("random_init", "gain") for k in ("linear_top1", "knn_top1"))
    assert math.isnan(m["probe_linear_c"]) and math.isnan(m["random_init_linear_c"])  # one C given: none chosen
