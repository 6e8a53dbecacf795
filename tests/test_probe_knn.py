"""kNN monitor and linear probe on data whose answer is known."""

from __future__ import annotations

import numpy as np
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
    x, y = _clusters()
    q, qy = _clusters(seed=1, n_per=20)
    q = q + 0  # queries from the same centres (same seed for centres is not needed: use bank centres)
    bank_x, bank_y = x, y
    acc = knn_accuracy(bank_x[::2], bank_y[::2], bank_x[1::2], bank_y[1::2], 4, k=10)
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


def test_linear_probe_converges_and_reports():
    x, y = _clusters(noise=0.5)
    names = ["a", "b", "c", "d"]
    res = linear_probe(x.numpy()[::2], y.numpy()[::2], x.numpy()[1::2], y.numpy()[1::2], names)
    assert res.converged
    assert res.metrics["top1"] > 0.95 and res.metrics["macro_f1"] > 0.95
    assert res.confusion.shape == (4, 4) and res.confusion.sum() == 100
    assert all(n in res.report for n in names)
    assert np.isclose(res.metrics["recall"], np.diag(res.confusion).sum() / 100, atol=0.05)


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
