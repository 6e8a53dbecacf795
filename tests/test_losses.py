"""Per-loss tests that can fail for the right reason: direct-formula parity, invariants (symmetry,
temperature, equipartition, masking), and clear errors on bad shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslray.raytrain.losses import (
    barlow_twins_loss,
    covariance_loss,
    dino_loss,
    infonce_loss,
    invariance_loss,
    mae_loss,
    multicrop_barlow_twins_loss,
    multicrop_cosine_loss,
    multicrop_vicreg_loss,
    multiview_nt_xent_loss,
    negative_cosine_similarity,
    nt_xent_loss,
    num_masked,
    patchify,
    prototype_scores,
    random_masking,
    sinkhorn,
    swav_loss,
    update_center,
    variance_loss,
    vicreg_loss,
)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def nt_xent_reference(z1, z2, t):
    """SimCLR eq. 1 written out as a double loop over the 2N anchors."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        sims = [math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / sum(sims))
    return total / n2


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_equals_direct_formula(t):
    z1, z2 = torch.randn(6, 5, generator=_g(1)), torch.randn(6, 5, generator=_g(2))
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(nt_xent_reference(z1, z2, t), rel=1e-5)


def multiview_reference(zs, t):
    """Multi-positive NT-Xent written out: every view of every image is an anchor, each other view
    of its image a positive, every other embedding in the denominator."""
    n, v = zs[0].shape[0], len(zs)
    z = F.normalize(torch.cat(zs).double(), dim=1)
    total = 0.0
    for i in range(v * n):
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(v * n) if k != i)
        pos = [b * n + i % n for b in range(v) if b != i // n]
        total += sum(-math.log(math.exp(float(z[i] @ z[p]) / t) / denom) for p in pos) / len(pos)
    return total / (v * n)


@pytest.mark.parametrize("views", [2, 3, 6])
def test_multiview_nt_xent_equals_direct_formula(views):
    zs = [torch.randn(5, 4, generator=_g(10 + k)) for k in range(views)]
    assert multiview_nt_xent_loss(zs, 0.2).item() == pytest.approx(multiview_reference(zs, 0.2), rel=1e-5)


def test_multiview_nt_xent_with_two_views_is_nt_xent_and_ignores_order():
    zs = [torch.randn(7, 6, generator=_g(20 + k)) for k in range(4)]
    assert multiview_nt_xent_loss(zs[:2], 0.3).item() == pytest.approx(nt_xent_reference(zs[0], zs[1], 0.3), rel=1e-5)
    ref = multiview_nt_xent_loss(zs, 0.3)
    torch.testing.assert_close(multiview_nt_xent_loss(zs[::-1], 0.3), ref)  # which view is "global" does not matter
    perm = torch.randperm(7, generator=_g(5))
    torch.testing.assert_close(multiview_nt_xent_loss([z[perm] for z in zs], 0.3), ref)  # nor the image order
    # pairing matters: shuffling the images of one view breaks its positives and raises the loss
    close = [zs[0] + 0.05 * torch.randn(7, 6, generator=_g(30 + k)) for k in range(4)]
    assert multiview_nt_xent_loss(close, 0.3) < multiview_nt_xent_loss(close[:3] + [close[3][perm]], 0.3)


def test_nt_xent_symmetric_and_temperature_matters():
    z1, z2 = torch.randn(8, 4, generator=_g(3)), torch.randn(8, 4, generator=_g(4))
    torch.testing.assert_close(nt_xent_loss(z1, z2), nt_xent_loss(z2, z1))
    assert not torch.isclose(nt_xent_loss(z1, z2, 0.1), nt_xent_loss(z1, z2, 0.5))
    # Matching views score much better than random pairs.
    assert nt_xent_loss(z1, z1 + 1e-3, 0.1) < nt_xent_loss(z1, z2, 0.1)


def test_infonce_matches_cross_entropy_and_moco_v2_mode():
    q, k, queue = torch.randn(4, 3, generator=_g(5)), torch.randn(4, 3, generator=_g(6)), torch.randn(7, 3, generator=_g(7))
    qn, kn, un = (F.normalize(x, dim=1) for x in (q, k, queue))
    logits = torch.cat([qn @ kn.t(), qn @ un.t()], 1) / 0.2
    torch.testing.assert_close(infonce_loss(q, k, queue, 0.2), F.cross_entropy(logits, torch.arange(4)))
    moco = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ un.t()], 1) / 0.2
    torch.testing.assert_close(infonce_loss(q, k, queue, 0.2, in_batch_negatives=False),
                               F.cross_entropy(moco, torch.zeros(4, dtype=torch.long)))
    # A rank's local queries against gathered keys: the offset picks its slice of positives.
    kk = torch.cat([torch.randn(4, 3, generator=_g(8)), k])
    torch.testing.assert_close(infonce_loss(q, kk, None, 0.2, offset=4),
                               F.cross_entropy(qn @ F.normalize(kk, dim=1).t() / 0.2, torch.arange(4, 8)))


def test_negative_cosine_similarity_range_and_stop_gradient():
    p = torch.randn(5, 4, generator=_g(9), requires_grad=True)
    z = torch.randn(5, 4, generator=_g(10), requires_grad=True)
    assert negative_cosine_similarity(p, p.detach() * 3).item() == pytest.approx(-1.0, abs=1e-6)
    negative_cosine_similarity(p, z).backward()
    assert p.grad is not None and z.grad is None


def _white(n, d, seed=0):
    """n samples whose d columns are exactly standardised and mutually uncorrelated."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_g(seed)).double())
    x = q[:, 1 : d + 1]  # orthonormal columns orthogonal to q[:, 0]; centre them exactly:
    x = x - x.mean(0)
    x, _ = torch.linalg.qr(x)
    return (x * math.sqrt(n)).float()


def test_barlow_twins_zero_for_identical_decorrelated_inputs():
    z = _white(64, 8)
    assert barlow_twins_loss(z, z).item() == pytest.approx(0.0, abs=1e-3)
    noisy = z + 0.5 * torch.randn(z.shape, generator=_g(11))
    assert barlow_twins_loss(z, noisy) > 0.05  # corr ~0.89 per dim: 8 * (1 - 0.89)^2
    torch.testing.assert_close(barlow_twins_loss(z, noisy), barlow_twins_loss(noisy, z), rtol=1e-4, atol=1e-5)


def test_barlow_twins_lambda_weights_off_diagonal():
    a, b = torch.randn(32, 6, generator=_g(12)), torch.randn(32, 6, generator=_g(13))
    assert barlow_twins_loss(a, b, lambda_=1.0) > barlow_twins_loss(a, b, lambda_=0.0)


def test_vicreg_variance_term_zero_when_std_at_least_one():
    z = torch.randn(128, 16, generator=_g(14)) * 3.0
    assert variance_loss(z).item() == 0.0
    z = z / z.std(0)  # std exactly 1 (sqrt(var + eps) > 1)
    assert variance_loss(z).item() == 0.0
    assert variance_loss(z * 0.5).item() == pytest.approx(0.5, abs=1e-3)


def test_vicreg_terms_and_total():
    z1, z2 = torch.randn(32, 8, generator=_g(15)), torch.randn(32, 8, generator=_g(16))
    assert invariance_loss(z1, z1).item() == 0.0
    assert covariance_loss(_white(64, 8)).item() == pytest.approx(0.0, abs=1e-6)
    expected = (25 * invariance_loss(z1, z2) + 25 * (variance_loss(z1) + variance_loss(z2)) / 2
                + covariance_loss(z1) + covariance_loss(z2))
    torch.testing.assert_close(vicreg_loss(z1, z2), expected)
    torch.testing.assert_close(vicreg_loss(z1, z2), vicreg_loss(z2, z1))


def test_sinkhorn_rows_and_columns_sum_as_specified():
    b, k = 64, 16
    scores = F.normalize(torch.randn(b, 8, generator=_g(17)), dim=1) @ F.normalize(torch.randn(k, 8, generator=_g(18)), dim=1).t()
    q = sinkhorn(scores, epsilon=0.05, iters=3)
    assert q.shape == (b, k) and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(b))  # each sample's code is a distribution
    # Prototype columns move towards equipartition (B/K each) with every iteration...
    def gap(codes):
        return float((codes.sum(0) - b / k).abs().max())
    gaps = [gap(F.softmax(scores / 0.05, dim=1))] + [gap(sinkhorn(scores, 0.05, i)) for i in (1, 2, 3, 10)]
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    q_many = sinkhorn(scores, epsilon=0.05, iters=200)
    torch.testing.assert_close(q_many.sum(0), torch.full((k,), b / k), rtol=1e-3, atol=1e-3)  # exact in the limit


def test_swav_loss_prefers_matching_scores():
    s1 = torch.randn(16, 10, generator=_g(19))
    codes = [sinkhorn(s1), sinkhorn(s1)]
    match = swav_loss([s1, s1, s1], codes, 0.1)
    other = swav_loss([s1, torch.randn(16, 10, generator=_g(20)), s1], codes, 0.1)
    assert match < other


def test_dino_center_is_an_ema_of_the_batch_mean():
    center = torch.zeros(1, 5)
    means = [torch.randn(1, 5, generator=_g(21 + i)) for i in range(3)]
    expected = torch.zeros(1, 5)
    for m in means:
        update_center(center, m, momentum=0.9)
        expected = 0.9 * expected + 0.1 * m
    torch.testing.assert_close(center, expected)


def test_dino_loss_formula_and_centre_effect():
    s = [torch.randn(4, 6, generator=_g(30 + i)) for i in range(3)]
    t = [torch.randn(4, 6, generator=_g(40 + i)) for i in range(2)]
    c = torch.randn(6, generator=_g(50))
    terms = []
    for iq in range(2):
        q = F.softmax((t[iq] - c) / 0.04, dim=1)
        for v in range(3):
            if v != iq:
                terms.append(-(q * F.log_softmax(s[v] / 0.1, dim=1)).sum(1).mean())
    torch.testing.assert_close(dino_loss(s, t, c, 0.1, 0.04), torch.stack(terms).mean())
    assert not torch.isclose(dino_loss(s, t, c), dino_loss(s, t, torch.zeros(6)))


def test_mae_masks_exactly_round_ratio_n_and_loss_only_on_masked():
    for n, ratio in [(64, 0.75), (49, 0.75), (16, 0.5), (10, 0.33)]:
        keep, mask, restore = random_masking(3, n, ratio, generator=_g(60))
        m = int(round(ratio * n))
        assert num_masked(n, ratio) == m
        assert (mask.sum(1) == m).all() and keep.shape == (3, n - m)
        # Visible indices are exactly the unmasked ones.
        assert (torch.gather(mask, 1, keep) == 0).all()
        assert (restore.sort(1).values == torch.arange(n)).all()
    imgs = torch.randn(2, 3, 16, 16, generator=_g(61))
    target = patchify(imgs, 4)
    _, mask, _ = random_masking(2, 16, 0.75, generator=_g(62))
    pred = torch.randn(target.shape, generator=_g(63))
    base = mae_loss(pred, target, mask, norm_pix=False)
    # Changing predictions on visible patches leaves the loss unchanged; on masked ones it does not.
    vis = (mask == 0).unsqueeze(-1)
    assert mae_loss(torch.where(vis, pred + 10, pred), target, mask, norm_pix=False) == base
    assert mae_loss(torch.where(~vis, pred + 10, pred), target, mask, norm_pix=False) != base
    direct = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(base, direct)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(mae_loss(normed, target, mask, norm_pix=True), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_patchify_layout():
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(imgs, 2)
    assert p.shape == (2, 4, 12)
    torch.testing.assert_close(p[0, 1].reshape(2, 2, 3).permute(2, 0, 1), imgs[0, :, 0:2, 2:4])


@pytest.mark.parametrize("call", [
    lambda: nt_xent_loss(torch.randn(4, 3), torch.randn(5, 3)),
    lambda: nt_xent_loss(torch.randn(4), torch.randn(4)),
    lambda: multiview_nt_xent_loss([torch.randn(4, 3)]),
    lambda: multiview_nt_xent_loss([torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 3)]),
    lambda: infonce_loss(torch.randn(4, 3), torch.randn(4, 2)),
    lambda: infonce_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 2)),
    lambda: barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 4)),
    lambda: vicreg_loss(torch.randn(4, 3), torch.randn(3, 3)),
    lambda: variance_loss(torch.randn(1, 3)),
    lambda: negative_cosine_similarity(torch.randn(4, 3), torch.randn(4, 3, 1)),
    lambda: sinkhorn(torch.randn(4)),
    lambda: swav_loss([torch.randn(4, 3)], [torch.randn(4, 3)]),
    lambda: swav_loss([torch.randn(4, 3), torch.randn(4, 5)], [torch.randn(4, 3)]),
    lambda: dino_loss([torch.randn(4, 3), torch.randn(4, 3)], [torch.randn(4, 5)], torch.zeros(5)),
    lambda: dino_loss([torch.randn(4, 3), torch.randn(4, 3)], [torch.randn(4, 3)], torch.zeros(4)),
    lambda: mae_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 2), torch.ones(2, 4)),
    lambda: mae_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.ones(2, 5)),
    lambda: patchify(torch.randn(1, 3, 6, 6), 4),
    lambda: random_masking(2, 16, 1.0),
])
def test_bad_shapes_raise_clear_errors(call):
    with pytest.raises(ValueError, match=r"expected|must|need|outside|entries"):
        call()


AUTOCAST_LOSSES = {
    "nt_xent": lambda a, b: nt_xent_loss(a, b, 0.1),
    "multiview_nt_xent": lambda a, b: multiview_nt_xent_loss([a, b, a.flip(0)], 0.1),
    "infonce_queue": lambda a, b: infonce_loss(a, b, b.roll(7, 0), 0.2, in_batch_negatives=False),
    "infonce_batch": lambda a, b: infonce_loss(a, b, None, 0.2),
    "barlow_twins": barlow_twins_loss,
    "vicreg": vicreg_loss,
    "swav_prototype_scores": lambda a, b: prototype_scores(a, b).square().mean(),
    "multicrop_barlow_twins": lambda a, b: multicrop_barlow_twins_loss([a, b, a.flip(0)]),
    "multicrop_vicreg": lambda a, b: multicrop_vicreg_loss([a, b, a.flip(0)]),
    "multicrop_cosine": lambda a, b: multicrop_cosine_loss([a, b, a.flip(0)], [b, a]),
}


@pytest.mark.parametrize("name", sorted(AUTOCAST_LOSSES))
def test_losses_are_float32_inside_bf16_autocast(name):
    """The step runs under bf16 autocast, which would round these losses' similarity/correlation
    matmuls (and at T=0.1 NT-Xent's value itself) to bf16: inside autocast each loss must equal the
    float32 loss of the same bf16 inputs, and still send gradients back to them."""
    loss = AUTOCAST_LOSSES[name]
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(128, 64, generator=g)
    z2 = z1 + 0.3 * torch.randn(128, 64, generator=g)
    a, b = z1.bfloat16().requires_grad_(), z2.bfloat16().requires_grad_()
    ref = loss(a.detach().float(), b.detach().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(a, b)
        assert torch.is_autocast_enabled("cpu")  # the caller's autocast is back on afterwards
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    got.backward()
    assert a.grad is not None and a.grad.dtype == torch.bfloat16 and a.grad.abs().sum() > 0


# --- Paper-formula parity for VICReg, Barlow Twins and SwAV (review §4: mutations M1-M5) -------------------


def _vicreg_reference(z1, z2, sim=25.0, std=25.0, cov=1.0):
    """VICReg (Bardes et al. 2022, eq. 1-6) written out in float64 loops, as the official code computes it.

    Two places where the official code (and this module) differ from the paper's equations, kept here:
    the invariance is the per-element MSE (eq. 5 writes 1/n sum_i ||z_i - z'_i||^2, D times larger), and
    the variance terms are averaged, std * (v(Z) + v(Z')) / 2, where eq. 6 writes mu * (v(Z) + v(Z')).
    """
    z1, z2 = z1.double(), z2.double()
    n, d = z1.shape
    inv = sum(float(z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def var_term(z):  # eq. 1: mean over dimensions of max(0, 1 - sqrt(Var(z^j) + eps)), Var unbiased
        total = 0.0
        for j in range(d):
            col = [float(z[i, j]) for i in range(n)]
            mean = sum(col) / n
            var = sum((c - mean) ** 2 for c in col) / (n - 1)
            total += max(0.0, 1.0 - math.sqrt(var + 1e-4))
        return total / d

    def cov_term(z):  # eq. 3-4: C = 1/(n-1) sum_i (z_i - zbar)(z_i - zbar)^T; sum_{a != b} C_ab^2 / d
        mean = [sum(float(z[i, j]) for i in range(n)) / n for j in range(d)]
        total = 0.0
        for a in range(d):
            for b in range(d):
                if a != b:
                    c_ab = sum((float(z[i, a]) - mean[a]) * (float(z[i, b]) - mean[b]) for i in range(n)) / (n - 1)
                    total += c_ab ** 2
        return total / d

    terms = {"inv": inv, "var1": var_term(z1), "var2": var_term(z2), "cov1": cov_term(z1), "cov2": cov_term(z2)}
    terms["total"] = sim * inv + std * (terms["var1"] + terms["var2"]) / 2 + cov * (terms["cov1"] + terms["cov2"])
    return terms


def test_vicreg_terms_equal_the_paper_formulas_on_random_inputs():
    """Catches M1 (invariance as mean absolute error) and M2 (covariance without the / D), and any change
    to the variance hinge, the (n-1) covariance normalisation or the coefficients of the total."""
    g = _g(70)
    # correlated columns with stds straddling 1, so every term (and the variance hinge) is non-zero
    base = torch.randn(24, 7, generator=g)
    z1 = (base + 0.8 * base.roll(1, dims=1)) * torch.linspace(0.2, 1.4, 7) + 0.3
    z2 = z1 + 0.3 * torch.randn(24, 7, generator=g)
    ref = _vicreg_reference(z1, z2)
    assert min(ref["inv"], ref["var1"], ref["var2"], ref["cov1"], ref["cov2"]) > 1e-2, ref  # nothing trivially 0
    assert invariance_loss(z1, z2).item() == pytest.approx(ref["inv"], rel=1e-5)
    assert variance_loss(z1).item() == pytest.approx(ref["var1"], rel=1e-5)
    assert variance_loss(z2).item() == pytest.approx(ref["var2"], rel=1e-5)
    assert covariance_loss(z1).item() == pytest.approx(ref["cov1"], rel=1e-5)
    assert covariance_loss(z2).item() == pytest.approx(ref["cov2"], rel=1e-5)
    assert vicreg_loss(z1, z2).item() == pytest.approx(ref["total"], rel=1e-5)
    custom = _vicreg_reference(z1, z2, sim=2.0, std=3.0, cov=0.5)["total"]
    assert vicreg_loss(z1, z2, sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5).item() == pytest.approx(custom, rel=1e-5)


def _barlow_reference(z1, z2, lambda_):
    """Barlow Twins (Zbontar et al. 2021) eq. 1 with C from eq. 2: the Pearson correlation of the batch-
    mean-centred embeddings, C_ij = sum_b a_bi b_bj / (sqrt(sum_b a_bi^2) sqrt(sum_b b_bj^2)), in loops.

    Eq. 2 equals standardising with the *biased* std and dividing a.T @ b by N, which is what the official
    code (BatchNorm1d(affine=False), eps 1e-5) and this module do; the paper's Algorithm 1 pseudocode uses
    z.std(0) (unbiased), which gives C larger by N/(N-1).
    """
    a = (z1 - z1.mean(0)).double()
    b = (z2 - z2.mean(0)).double()
    n, d = a.shape
    total = 0.0
    for i in range(d):
        for j in range(d):
            num = sum(float(a[k, i] * b[k, j]) for k in range(n))
            c_ij = num / (math.sqrt(sum(float(a[k, i]) ** 2 for k in range(n)))
                          * math.sqrt(sum(float(b[k, j]) ** 2 for k in range(n))))
            total += (1 - c_ij) ** 2 if i == j else lambda_ * c_ij ** 2
    return total


@pytest.mark.parametrize("lambda_", [5e-3, 1.0])
def test_barlow_twins_equals_eq1_with_pearson_cross_correlation(lambda_):
    """Catches M3 (off-diagonal |C_ij| instead of C_ij^2) and any change to the standardisation, the / N
    or the on-diagonal (1 - C_ii)^2."""
    g = _g(71)
    z1 = torch.randn(32, 6, generator=g) * torch.linspace(0.5, 3.0, 6) + 2.0
    z2 = 0.8 * z1 + torch.randn(32, 6, generator=g)
    ref = _barlow_reference(z1, z2, lambda_)
    # the module's eps (1e-5 next to variances of ~1-10) moves the loss by far less than rel 1e-4
    assert barlow_twins_loss(z1, z2, lambda_=lambda_).item() == pytest.approx(ref, rel=1e-4)


def test_swav_loss_equals_swapped_prediction_formula_and_depends_on_temperature():
    """Catches M4 (temperature dropped from the log-softmax) and M5 (a crop also predicting its own code)."""
    g = _g(72)
    scores = [torch.randn(5, 8, generator=g) for _ in range(4)]  # 2 global + 2 local crops
    codes = [F.softmax(torch.randn(5, 8, generator=g) * 2, dim=1) for _ in range(2)]
    for t in (0.1, 0.5):
        terms = []
        for i, q in enumerate(codes):
            for v, s in enumerate(scores):
                if v != i:
                    terms.append(-(q * F.log_softmax(s / t, dim=1)).sum(1).mean())
        assert len(terms) == 6
        torch.testing.assert_close(swav_loss(scores, codes, t), torch.stack(terms).mean())
    assert not torch.isclose(swav_loss(scores, codes, 0.1), swav_loss(scores, codes, 0.5))


def test_vicregl_local_terms_are_per_position_batch_statistics_and_covariance_is_averaged_over_views():
    """VICRegL's code: on matched maps (B, k, D), each of the k positions has its own variance and
    covariance over the batch (a pooled (B*k, D) statistic mixes the positions of one image), the
    covariance of the two sides is averaged, not summed as in VICReg; its global term averages too."""
    from sslray.raytrain.losses import local_vicreg_loss

    g = _g(71)
    a = torch.randn(6, 3, 5, generator=g) * torch.linspace(0.3, 1.5, 5) + torch.randn(1, 3, 5, generator=g)
    b = a + 0.4 * torch.randn(6, 3, 5, generator=g)
    inv = ((a - b) ** 2).mean().item()
    var, cov = [], []
    for x in (a, b):  # one position at a time, written out with the VICReg terms of that position's rows
        per = [_vicreg_reference(x[:, j], x[:, j]) for j in range(x.shape[1])]
        var.append(sum(p["var1"] for p in per) / len(per))
        cov.append(sum(p["cov1"] for p in per) / len(per))
    expected = 25 * inv + 25 * (var[0] + var[1]) / 2 + 1 * (cov[0] + cov[1]) / 2
    assert local_vicreg_loss(a, b).item() == pytest.approx(expected, rel=1e-5)
    pooled = vicreg_loss(a.reshape(-1, 5), b.reshape(-1, 5), cov_views="mean").item()
    assert abs(pooled - expected) > 1e-3 * expected  # the pooled statistics are another number

    z1, z2 = a[:, 0], b[:, 0]
    ref = _vicreg_reference(z1, z2)
    mean_cov = 25 * ref["inv"] + 25 * (ref["var1"] + ref["var2"]) / 2 + (ref["cov1"] + ref["cov2"]) / 2
    assert vicreg_loss(z1, z2, cov_views="mean").item() == pytest.approx(mean_cov, rel=1e-5)
    with pytest.raises(ValueError, match="local_vicreg_loss"):
        local_vicreg_loss(a[:1], b[:1])
