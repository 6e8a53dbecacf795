"""Non-contrastive losses: SimSiam/BYOL cosine, Barlow Twins, VICReg (each also over multi-crop views)
and VICRegL's local matching."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import full_precision


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str, min_n: int = 1) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: expected two (N, D) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < min_n:
        raise ValueError(f"{name}: needs at least {min_n} samples, got {a.shape[0]}")


def negative_cosine_similarity(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``-mean_i cos(p_i, stopgrad(z_i))`` (SimSiam, Chen & He 2021, eq. 1). BYOL's normalised MSE
    (Grill et al. 2020, eq. 2) is ``2 + 2 * this``. The stop-gradient on ``z`` is applied here."""
    _check_pair(p, z, "negative_cosine_similarity")
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def _standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # Batch-norm without affine, biased variance: what BarlowTwins' nn.BatchNorm1d(affine=False) does.
    return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)


@full_precision
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambda_: float = 5e-3,
                      scale_loss: float = 1.0) -> torch.Tensor:
    """Barlow Twins (Zbontar et al., ICML 2021, eq. 1): ``sum_i (1 - C_ii)^2 + lambda * sum_{i!=j} C_ij^2``
    with ``C`` the cross-correlation of the batch-standardised embeddings (N, D), times ``scale_loss``.

    Batch statistics make this a global-batch loss: under DDP pass gathered embeddings.
    ``lambda_`` 5e-3 is the paper's value (1/D-ish for D=8192). ``scale_loss`` 1.0 is the paper's
    (ImageNet); CIFAR recipes tuned with a smaller one (0.1) need it, because the parameters LARS does
    not adapt (biases, BN) step by ``lr * grad`` and so by ``scale_loss`` too.
    """
    _check_pair(z1, z2, "barlow_twins_loss", min_n=2)
    n = z1.shape[0]
    c = _standardise(z1.float()).t() @ _standardise(z2.float()) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return scale_loss * (on_diag + lambda_ * off_diag)


def invariance_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """VICReg invariance term s(Z, Z'): mean squared distance (Bardes et al., ICLR 2022, eq. 5)."""
    _check_pair(z1, z2, "invariance_loss")
    return F.mse_loss(z1.float(), z2.float())


def variance_loss(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg variance term v(Z) (eq. 1): mean over dimensions of ``relu(gamma - sqrt(Var + eps))``;
    zero once every dimension's std reaches ``gamma``."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"variance_loss: expected (N, D) with N >= 2, got {tuple(z.shape)}")
    std = torch.sqrt(z.float().var(0) + eps)
    return F.relu(gamma - std).mean()


@full_precision
def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """VICReg covariance term c(Z) (eq. 3): squared off-diagonal covariances summed, divided by D."""
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"covariance_loss: expected (N, D) with N >= 2, got {tuple(z.shape)}")
    n, d = z.shape
    z = z.float() - z.float().mean(0)
    cov = z.t() @ z / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, cov_views: str = "sum") -> torch.Tensor:
    """VICReg (Bardes et al., ICLR 2022, eq. 6) with the paper's coefficients lambda=mu=25, nu=1.

    Variance and covariance are batch statistics: under DDP pass gathered embeddings. The covariance
    terms of the two views are summed (VICReg, eq. 6); ``cov_views="mean"`` averages them, as
    VICRegL's code does for its global and local terms.
    """
    _check_pair(z1, z2, "vicreg_loss", min_n=2)
    cov = covariance_loss(z1) + covariance_loss(z2)
    return (sim_coeff * invariance_loss(z1, z2)
            + std_coeff * (variance_loss(z1) + variance_loss(z2)) / 2
            + cov_coeff * (cov / 2 if cov_views == "mean" else cov))


def multicrop_pairs(n_views: int, n_global: int = 2) -> list[tuple[int, int]]:
    """The compared pairs ``(g, v)`` of a multi-crop batch, global crops first (Caron et al. 2020,
    sec. 3.2): every global crop with every later view, global or local; local crops are not compared
    with each other. Two views give the one pair (0, 1); 2 global and k local crops give 1 + 2k."""
    if not 1 <= n_global <= n_views or n_views < 2:
        raise ValueError(f"multicrop_pairs: needs at least 2 views of which 1 to all are global, got {n_views} "
                         f"views, {n_global} global")
    return [(g, v) for g in range(n_global) for v in range(g + 1, n_views)]


def _check_views(zs, name: str) -> None:
    if len(zs) < 2:
        raise ValueError(f"{name}: needs at least 2 views, got {len(zs)}")
    for z in zs[1:]:
        _check_pair(zs[0], z, name, min_n=2)


def multicrop_barlow_twins_loss(zs, n_global: int = 2, lambda_: float = 5e-3,
                                scale_loss: float = 1.0) -> torch.Tensor:
    """Barlow Twins over 2 global and any local crops ``zs`` (each (N, D), global first): the mean of
    :func:`barlow_twins_loss` over :func:`multicrop_pairs`, so its scale does not grow with the number
    of crops. Two views: exactly ``barlow_twins_loss`` (the same computation)."""
    if len(zs) == 2:
        return barlow_twins_loss(zs[0], zs[1], lambda_=lambda_, scale_loss=scale_loss)
    _check_views(zs, "multicrop_barlow_twins_loss")
    pairs = multicrop_pairs(len(zs), n_global)
    terms = (barlow_twins_loss(zs[g], zs[v], lambda_=lambda_, scale_loss=scale_loss) for g, v in pairs)
    return _total(terms) / len(pairs)


def multicrop_vicreg_loss(zs, n_global: int = 2, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                          cov_coeff: float = 1.0) -> torch.Tensor:
    """VICReg over 2 global and any local crops ``zs`` (each (N, D), global first): the invariance
    term averaged over :func:`multicrop_pairs`; variance and covariance are terms of each view alone,
    averaged over the views. The two-view loss averages the variance of its 2 views and sums their
    covariance (eq. 6), i.e. twice their mean: kept, so the scale does not change with the number of
    crops. Two views: exactly ``vicreg_loss`` (the same computation)."""
    if len(zs) == 2:
        return vicreg_loss(zs[0], zs[1], sim_coeff=sim_coeff, std_coeff=std_coeff, cov_coeff=cov_coeff)
    return _multicrop_vicreg(zs, n_global, sim_coeff, std_coeff, cov_coeff)


def _multicrop_vicreg(zs, n_global, sim_coeff, std_coeff, cov_coeff):
    _check_views(zs, "multicrop_vicreg_loss")
    pairs = multicrop_pairs(len(zs), n_global)
    inv = _total(invariance_loss(zs[g], zs[v]) for g, v in pairs) / len(pairs)
    var = _total(variance_loss(z) for z in zs) / len(zs)
    cov = 2 * _total(covariance_loss(z) for z in zs) / len(zs)
    return sim_coeff * inv + std_coeff * var + cov_coeff * cov


def multicrop_cosine_loss(ps, ts) -> torch.Tensor:
    """BYOL with multi-crop: the mean of :func:`negative_cosine_similarity` of the online prediction
    of every view ``ps[i]`` (global crops first, then local) against the target projection of every
    global crop ``ts[j]`` of another view (``i != j``), as solo-learn's multi-crop BYOL pairs them;
    the target never sees a local crop. 2 global and k local crops: 2 (1 + k) pairs. Two views:
    ``(ncs(p1, t2) + ncs(p2, t1)) / 2``."""
    if len(ts) < 1 or len(ps) < 2 or len(ts) > len(ps):
        raise ValueError(f"multicrop_cosine_loss: needs at least 2 predictions and 1 to that many targets, got "
                         f"{len(ps)} and {len(ts)}")
    terms = [negative_cosine_similarity(ps[i], ts[j]) for i in range(len(ps)) for j in range(len(ts)) if i != j]
    return _total(terms) / len(terms)


def _total(terms) -> torch.Tensor:
    # Left to right, without sum()'s leading 0: two terms add as a + b, the two-view losses' own sum.
    it = iter(terms)
    total = next(it)
    for t in it:
        total = total + t
    return total


@full_precision
def local_vicreg_loss(a: torch.Tensor, b: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                      cov_coeff: float = 1.0) -> torch.Tensor:
    """VICRegL's loss on matched local features ``a``, ``b`` (B, k, D): the k-th match of every image is
    one position; variance and covariance are statistics over the batch at each position, averaged
    over the positions and the two sides (the paper's code, ``_vicreg_loss`` on maps). Under DDP pass
    gathered maps: the statistics span the global batch."""
    if a.ndim != 3 or a.shape != b.shape or a.shape[0] < 2:
        raise ValueError(f"local_vicreg_loss: expected two (B, k, D) maps with B >= 2, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")

    def var_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, d = x.shape
        x = x.float() - x.float().mean(0)
        std = torch.sqrt(x.var(0) + 1e-4)  # (k, D)
        cov = torch.einsum("nkc,nke->kce", x, x) / (n - 1)  # (k, D, D)
        off = cov.pow(2).sum((1, 2)) - torch.diagonal(cov, dim1=1, dim2=2).pow(2).sum(1)
        return F.relu(1.0 - std).mean(), (off / d).mean()

    (va, ca), (vb, cb) = var_cov(a), var_cov(b)
    return sim_coeff * F.mse_loss(a.float(), b.float()) + std_coeff * (va + vb) / 2 + cov_coeff * (ca + cb) / 2


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # x (B, L, D), idx (B, L', k) -> (B, L', k, D)
    b, lp, k = idx.shape
    flat = torch.gather(x, 1, idx.reshape(b, lp * k, 1).expand(-1, -1, x.shape[-1]))
    return flat.reshape(b, lp, k, x.shape[-1])


def nearest_by_location(f1: torch.Tensor, f2: torch.Tensor, loc1: torch.Tensor, loc2: torch.Tensor,
                        k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """VICRegL location matching (Bardes et al., NeurIPS 2022, sec. 3.2): for every location of map 1,
    the ``k`` locations of map 2 closest in *image* coordinates; pairs are then kept for the ``k``
    locations of map 1 whose nearest partner is closest. ``f*`` (B, L, D), ``loc*`` (B, L, 2).
    Returns matched (B*k, D) rows of map 1 and map 2."""
    if f1.ndim != 3 or f1.shape != f2.shape or loc1.shape[:2] != f1.shape[:2] or loc1.shape != loc2.shape:
        raise ValueError(f"nearest_by_location: expected f (B, L, D) and loc (B, L, 2), got {tuple(f1.shape)}, "
                         f"{tuple(f2.shape)}, {tuple(loc1.shape)}, {tuple(loc2.shape)}")
    return _match(f1, f2, torch.cdist(loc1.float(), loc2.float()), k)


def nearest_by_feature(f1: torch.Tensor, f2: torch.Tensor, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """VICRegL feature matching: as :func:`nearest_by_location` but with L2 distance between features."""
    if f1.ndim != 3 or f1.shape != f2.shape:
        raise ValueError(f"nearest_by_feature: expected two (B, L, D) maps, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    return _match(f1, f2, torch.cdist(f1.detach().float(), f2.detach().float()), k)


def _match(f1, f2, dist, k):
    k = min(k, f1.shape[1])
    best, nn_idx = dist.min(dim=2)  # (B, L): each map-1 location's nearest map-2 location
    keep = best.topk(k, dim=1, largest=False).indices  # (B, k): the k best-matched map-1 locations
    a = torch.gather(f1, 1, keep.unsqueeze(-1).expand(-1, -1, f1.shape[-1]))
    b = _gather_rows(f2, torch.gather(nn_idx, 1, keep).unsqueeze(-1)).squeeze(2)
    return a.reshape(-1, f1.shape[-1]), b.reshape(-1, f2.shape[-1])
