"""I-JEPA (Assran et al., CVPR 2023): the multi-block masks, the loss against a hand-written reference,
the EMA target encoder and one training step of a tiny model (ViT-Ti with 8-px patches on 32-px images)."""

from __future__ import annotations

import pytest
import torch

import test_methods as T
from sslray.config import load_config
from sslray.datasets.views import PRESETS
from sslray.raytrain.losses import ijepa_loss, multiblock_masks
from sslray.raytrain.methods import create_method
from sslray.raytrain.methods._ema import ema_momentum

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**params):
    over = {**T.TINY, **T.EXTRA["ijepa"]}
    over.update({f"method.params.{k}": v for k, v in {**T.PARAMS["ijepa"], **params}.items()})
    torch.manual_seed(0)
    return create_method(load_config("ijepa_cifar10", over))


def _rc(idx: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    return idx // grid, idx % grid


# --- masks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_context_and_targets_are_disjoint_and_targets_are_whole_rectangles(seed):
    """On an 8x8 grid four blocks of at most 12 patches never cover the 7x7 context block, so no
    relaxation is needed: the context holds no target patch of its image."""
    torch.manual_seed(seed)
    ctx, tgt = multiblock_masks(16, 8, min_context=1)
    assert tgt.shape[:2] == (4, 16) and ctx.shape[0] == 16 and ctx.shape[1] > 0
    for b in range(16):
        assert not set(ctx[b].tolist()) & set(tgt[:, b].flatten().tolist()), f"image {b}: context meets a target"
    shapes = set()
    for block in tgt.reshape(-1, tgt.shape[-1]):
        r, c = _rc(block, 8)
        h, w = int(r.max() - r.min() + 1), int(c.max() - c.min() + 1)
        assert len(set(block.tolist())) == h * w == block.numel(), "a target block is not a whole rectangle"
        shapes.add((h, w))
    assert len(shapes) == 1, "one target block size per batch (the paper's collator)"


@pytest.mark.parametrize("seed", range(6))
def test_block_sizes_follow_the_scale_and_aspect_ranges(seed):
    """14x14 patches (224 px, ViT-B/16): target blocks of 15-20% of the patches with h / w in 0.75-1.5,
    the context within one square block of 85-100% of the patches (13x13: one side short of the grid, as
    the paper code shrinks a block that would fill it)."""
    torch.manual_seed(seed)
    ctx, tgt = multiblock_masks(8, 14)
    r, c = _rc(tgt[0, 0], 14)
    h, w = int(r.max() - r.min() + 1), int(c.max() - c.min() + 1)
    assert 0.15 * 196 - h - w <= h * w <= 0.2 * 196 + h + w, (h, w)  # rounding each side: at most a row/column
    assert 0.75 - 0.5 / w <= h / w <= 1.5 + 0.5 / w, (h, w)
    for b in range(8):
        r, c = _rc(ctx[b], 14)
        assert r.max() - r.min() < 13 and c.max() - c.min() < 13
    assert ctx.shape[1] >= 10  # min_context


def test_masks_are_ascending_and_cut_to_a_common_count():
    from sslray.raytrain.losses.mim import _first_k

    torch.manual_seed(0)
    ctx, _ = multiblock_masks(32, 8, min_context=1)
    for row in ctx:
        assert torch.equal(row, row.unique()), "context indices not ascending and unique"
    # the cut (the collator's truncation to the batch minimum): each row's first k set positions
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    assert _first_k(mask, 3).tolist() == [[1, 2, 4], [0, 1, 3]]
    one = []
    for seed in range(20):
        torch.manual_seed(seed)
        one.append(multiblock_masks(1, 8, min_context=1)[0].shape[1])
    assert min(one) < max(one), "the context count varies per image"
    torch.manual_seed(0)
    assert multiblock_masks(64, 8, min_context=1)[0].shape[1] <= min(one)  # many images: their minimum


def test_target_blocks_reach_every_edge_of_the_grid():
    """Every placement is drawn, the last row and column included (the paper code's
    ``randint(0, grid - h)`` never reaches them)."""
    torch.manual_seed(0)
    r, c = _rc(multiblock_masks(64, 8)[1], 8)
    assert {int(r.min()), int(c.min()), int(r.max()), int(c.max())} == {0, 7}


def test_masks_are_deterministic_under_a_seed_and_differ_across_seeds():
    def draw(seed):
        torch.manual_seed(seed)
        return multiblock_masks(8, 8)

    a, b, c = draw(1), draw(1), draw(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


def test_masks_relax_rather_than_leave_a_tiny_grid_without_context():
    """A 4x4 grid (the tiny test ViT): the context block is 3x3 and four targets may cover it; the
    exclusion is relaxed from the last target block until at least ``min_context`` patches remain."""
    for seed in range(20):
        torch.manual_seed(seed)
        ctx, _ = multiblock_masks(16, 4, min_context=4)
        assert ctx.shape[1] >= 4


# --- loss ------------------------------------------------------------------------------------------

def _reference(pred, tokens, targets):
    """The paper code: layer norm without affine, gather each block, smooth L1 (beta 1), mean per block,
    then over blocks."""
    mu, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
    h = (tokens - mu) / torch.sqrt(var + 1e-5)
    losses = []
    for m in range(targets.shape[0]):
        want = torch.stack([h[b, targets[m, b]] for b in range(targets.shape[1])])
        d = (pred[m] - want).abs()
        losses.append(torch.where(d < 1, 0.5 * d**2, d - 0.5).mean())
    return torch.stack(losses).mean()


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(3, 10, 8, generator=g) * 2 + 1
    targets = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(2 * 3)]).reshape(2, 3, 4)
    pred = torch.randn(2, 3, 4, 8, generator=g)
    return pred, tokens, targets


def test_loss_matches_a_hand_written_reference():
    pred, tokens, targets = _loss_inputs()
    torch.testing.assert_close(ijepa_loss(pred, tokens, targets), _reference(pred, tokens, targets))


def test_loss_is_zero_at_the_normed_targets_symmetric_and_quadratic_near_them():
    pred, tokens, targets = _loss_inputs(1)
    normed = torch.nn.functional.layer_norm(tokens, (8,))
    exact = torch.stack([torch.stack([normed[b, targets[m, b]] for b in range(3)]) for m in range(2)])
    assert float(ijepa_loss(exact, tokens, targets)) == pytest.approx(0.0, abs=1e-7)
    delta = torch.randn_like(exact) * 0.1  # |d| < 1: the quadratic part of smooth L1
    base = ijepa_loss(exact + delta, tokens, targets)
    torch.testing.assert_close(ijepa_loss(exact - delta, tokens, targets), base)  # symmetric in the error
    torch.testing.assert_close(ijepa_loss(exact + 2 * delta, tokens, targets), 4 * base)


def test_only_the_target_positions_of_the_target_tokens_matter_and_they_get_no_gradient():
    pred, tokens, targets = _loss_inputs(2)
    pred.requires_grad_(True)
    tokens.requires_grad_(True)
    base = ijepa_loss(pred, tokens, targets)
    base.backward()
    assert tokens.grad is None, "gradient reached the target encoder's tokens"
    used = torch.zeros(3, 10, dtype=torch.bool)
    for m in range(2):
        used[torch.arange(3), targets[m].T] = True
    b, n = (~used).nonzero()[0].tolist()  # a patch of image b that no block of image b takes
    other = tokens.detach().clone()
    other[b, n] += 5.0
    assert torch.equal(ijepa_loss(pred, other, targets), base.detach())
    b, n = used.nonzero()[0].tolist()
    other = tokens.detach().clone()
    other[b, n] = other[b, n] * torch.linspace(-2, 2, 8)
    assert not torch.equal(ijepa_loss(pred, other, targets), base.detach())


# --- the model -------------------------------------------------------------------------------------

def test_only_the_context_encoder_and_predictor_get_gradients():
    model = _tiny()
    loss = model([torch.randn(4, 3, 32, 32)])["loss"]
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.target.parameters())
    for part in (model.backbone, model.predictor):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads[:-2])  # not necessarily the unused head's
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_the_target_follows_the_context_encoder_by_the_linear_momentum():
    assert ema_momentum(0, 10, 0.996, "linear") == 0.996 and ema_momentum(10, 10, 0.996, "linear") == 1.0
    assert ema_momentum(5, 10, 0.99, "linear", 0.999) == pytest.approx(0.9945)
    model = _tiny(momentum=0.99)
    s = model.backbone.blocks[0].attn.qkv.weight
    t = model.target.module[0].blocks[0].attn.qkv.weight
    assert torch.equal(s, t)  # the target starts as a copy
    with torch.no_grad():
        s.add_(1.0)
    before = t.detach().clone()
    model.on_step(5, 10)
    m = 0.99 + (1 - 0.99) * 5 / 10
    torch.testing.assert_close(t, m * before + (1 - m) * s.detach())


def test_one_step_trains_encoder_and_predictor_and_the_probe_reads_mean_tokens():
    model = _tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    watch = {"encoder": model.backbone.blocks[0].mlp.fc1.weight, "predictor": model.predictor.blocks[0].mlp.fc1.weight,
             "target": model.target.module[0].blocks[0].mlp.fc1.weight}
    before = {k: v.detach().clone() for k, v in watch.items()}
    loss = model([torch.randn(4, 3, 32, 32)])["loss"]
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(watch["encoder"], before["encoder"])
    assert not torch.equal(watch["predictor"], before["predictor"])
    assert torch.equal(watch["target"], before["target"])  # only on_step moves it
    x = torch.randn(3, 3, 32, 32)
    feats = model.backbone.eval()(x)
    assert feats.shape == (3, model.backbone.embed_dim)
    every = torch.arange(16).expand(3, -1)
    torch.testing.assert_close(feats, model.encode_context(x, every).mean(1))  # the paper's eval feature


def test_the_preset_crops_without_flip_or_colour():
    (p, n), = PRESETS.get("ijepa")(size=32)
    assert n == 1 and p.scale == (0.3, 1.0) and p.hflip_p == 0
    assert p.jitter_p == p.grey_p == p.blur_p == p.solarize_p == 0


def test_a_cnn_backbone_is_refused_by_name():
    with pytest.raises(ValueError, match="VisionTransformer"):
        create_method(load_config("ijepa_cifar10", {"model.backbone": "resnet10t"}))


@pytest.mark.parametrize("params, key", [
    ({"momentum_schedule": "cosin"}, "momentum_schedule"),
    ({"target_scale_min": 0.3, "target_scale_max": 0.2}, "target_scale"),
    ({"context_scale_max": 1.2}, "context_scale"),
    ({"target_aspect_min": 0.0}, "target_aspect"),
    ({"num_targets": 0}, "num_targets"),
])
def test_bad_mask_and_momentum_params_are_refused_by_key(params, key):
    from sslray.config import ConfigError

    with pytest.raises(ConfigError, match=f"method.params.{key}"):
        _tiny(**params)
