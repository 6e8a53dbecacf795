"""kNN monitor and linear probe on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslray.raytrain.knn import knn_accuracy, knn_predict
from sslray.raytrain.probe import linear_probe, macro_scores


def _clusters(n_per=50, classes=4, dim=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centres[y] + noise * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_is_perfect_on_separated_clusters_and_chance_on_noise():
    x, y = _clusters()  # even rows the bank, odd rows the queries: the same four clusters
    acc = knn_accuracy(x[::2], y[::2], x[1::2], y[1::2], 4, k=10)
    assert acc["knn_top1"] == 1.0
    noise = torch.randn(400, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(4))
    acc = knn_accuracy(noise[:200], labels[:200], noise[200:], labels[200:], 4, k=20)
    assert 0.1 < acc["knn_top1"] < 0.45


def test_knn_weights_closer_neighbours_more():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_predict(torch.tensor([[1.0, 0.05]]), bank, labels, 2, k=3, temperature=0.07)
    assert scores.argmax(1).item() == 0  # one very close neighbour outvotes two far ones


def test_knn_top5_counts_only_classes_a_neighbour_voted_for():
    """10 one-hot classes, k=2: each query's two neighbours are of one other class. Its true class got no
    vote, so neither top-1 nor top-5 may count it (zero-score classes used to fill the top 5 by tie order)."""
    eye = torch.eye(10)
    bank, bank_y = torch.cat([eye, eye]), torch.arange(10).repeat(2)
    q, qy = eye, (torch.arange(10) + 1) % 10
    assert knn_accuracy(q, qy, bank, bank_y, 10, k=2) == {"knn_top1": 0.0, "knn_top5": 0.0}
    assert knn_accuracy(q, torch.arange(10), bank, bank_y, 10, k=2) == {"knn_top1": 1.0, "knn_top5": 1.0}


def test_knn_is_exact_at_a_small_temperature_and_refuses_nonsense():
    """exp(sim / 0.01) overflows float32 at sim ~ 0.9; scaled per query the vote is still the exact one:
    one neighbour of class 0 at cos 0.999 against five of class 1 at cos 0.998 (class 1 wins in float64)."""
    import math

    import pytest

    def unit(c):
        return [c, math.sqrt(1 - c * c)]

    bank = torch.tensor([unit(0.999)] + [unit(0.998)] * 5)
    labels = torch.tensor([0, 1, 1, 1, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    for t in (0.07, 0.02, 0.01, 0.005):
        want = 1 if 5 * math.exp((0.998 - 0.999) / t) > 1 else 0
        scores = knn_predict(q, bank, labels, 2, k=6, temperature=t)
        assert torch.isfinite(scores).all() and scores.argmax(1).item() == want, (t, scores)
    with pytest.raises(ValueError, match="k >= 1 and a temperature above 0"):
        knn_predict(q, bank, labels, 2, k=0)
    with pytest.raises(ValueError, match="k >= 1 and a temperature above 0"):
        knn_predict(q, bank, labels, 2, temperature=0.0)


def test_linear_probe_converges_and_reports():
    x, y = _clusters(noise=0.5)
    names = ["a", "b", "c", "d"]
    res = linear_probe(x.numpy()[::2], y.numpy()[::2], x.numpy()[1::2], y.numpy()[1::2], names)
    assert res.converged
    assert res.metrics["top1"] > 0.95 and res.metrics["macro_f1"] > 0.95
    assert res.confusion.shape == (4, 4) and res.confusion.sum() == 100
    assert all(n in res.report for n in names)
    assert np.isclose(res.metrics["recall"], np.diag(res.confusion).sum() / 100, atol=0.05)


def test_small_probe_fits_run_on_one_blas_thread_and_give_the_same_numbers(monkeypatch):
    from threadpoolctl import threadpool_info

    import sslray.raytrain.probe as P

    assert P.blas_threads(128 * 512) == 1 and P.blas_threads(50_000 * 512) is None
    seen = []
    real_fit = P.LogisticRegression.fit

    def fit(self, *a, **k):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return real_fit(self, *a, **k)

    monkeypatch.setattr(P.LogisticRegression, "fit", fit)
    x, y = _clusters(noise=0.5)
    args = (x.numpy()[::2], y.numpy()[::2], x.numpy()[1::2], y.numpy()[1::2], ["a", "b", "c", "d"])
    one, default = linear_probe(*args), linear_probe(*args, threads=None)
    assert seen[0] == {1}  # under the rule's limit while the solver runs
    assert one.metrics == pytest.approx(default.metrics) and np.array_equal(one.confusion, default.confusion)


def test_macro_scores_leave_out_classes_the_val_set_lacks():
    """A perfect classifier on a val set holding 5 of 10 classes scores 1, not 0.5; a prediction into
    a class with no val image still counts against it (scikit-learn's default labels as reference)."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    y = np.repeat(np.arange(5), 4)
    assert macro_scores(y, y.copy()) == {"macro_f1": 1.0, "precision": 1.0, "recall": 1.0}
    pred = y.copy()
    pred[0] = 9  # class 9 has no val image
    got = macro_scores(y, pred)
    assert got["macro_f1"] < 1 and got["precision"] < 1 and got["recall"] < 1
    for key, ref in (("macro_f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        assert got[key] == ref(y, pred, average="macro", zero_division=0)


def test_linear_probe_on_a_val_subset_scores_the_classes_it_holds():
    x, y = _clusters(classes=4)
    names = ["a", "b", "c", "d"]
    val = (y < 2).numpy()[1::2]  # the val set holds classes a and b only
    res = linear_probe(x.numpy()[::2], y.numpy()[::2], x.numpy()[1::2][val], y.numpy()[1::2][val], names)
    assert res.metrics["top1"] == 1.0
    assert (res.metrics["macro_f1"], res.metrics["precision"], res.metrics["recall"]) == (1.0, 1.0, 1.0)
    assert res.confusion.shape == (4, 4) and all(n in res.report for n in names)  # every class still shown
    # the report's own macro row averages all 4 classes (2 of them empty); its last row is the logged one
    sk_macro = next(line for line in res.report.splitlines() if line.strip().startswith("macro avg "))
    assert float(sk_macro.split()[-2]) == 0.5
    last = res.report.strip().splitlines()[-1]
    assert "2 classes present" in last and [float(v) for v in last.split()[-4:-1]] == [1.0, 1.0, 1.0]


def test_extracted_labels_survive_ffcv_buffer_reuse(cifar_small):
    """FFCV hands out the same buffers for later batches; features and labels must be copies."""
    from sslray.datasets.loader import make_loader
    from sslray.datasets.views import EvalTransform
    from sslray.raytrain.knn import extract_features

    loader = make_loader(cifar_small["test"], 32, res=32, device=torch.device("cpu"), train=False, num_workers=1)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    feats, labels = extract_features(backbone, loader, EvalTransform(32), torch.device("cpu"))
    assert labels.tolist() == [c for c in range(10) for _ in range(30)]  # class-sorted ImageFolder order
    assert feats.shape == (300, 4) and feats.std(0).min() > 0


def test_every_top5_uses_one_k_that_is_never_trivially_perfect():
    """kNN, the linear probe, the online probe and fine-tuning all take top5_k: with C classes top-C is 1.0."""
    from sslray.raytrain.knn import top5_k

    assert [top5_k(c) for c in (2, 3, 5, 6, 10, 1000)] == [1, 2, 4, 5, 5, 5]
    # 4 classes, features that are noise: no top-"5" may be 1.0 (it was for kNN, which took top-4 of 4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g), torch.randint(0, 4, (200,), generator=g)
    assert knn_accuracy(x[:100], y[:100], x[100:], y[100:], 4, k=50)["knn_top5"] < 1.0
    res = linear_probe(x[100:].numpy(), y[100:].numpy(), x[:100].numpy(), y[:100].numpy(), list("abcd"))
    assert res.metrics["top5"] < 1.0
