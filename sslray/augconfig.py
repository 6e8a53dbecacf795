"""``views.mean``, ``views.std`` and ``views.aug``: what they accept and how they reach the views.

Data from another domain (medical, satellite, microscopy) needs its own normalisation statistics and
often other augmentations (no colour ops on stains, no flips on text). This module is torch-free so
that ``ViewConfig`` checks these keys when the config is built: a typo fails on the command line,
not in a Ray worker. ``sslray.datasets.views`` applies them to every view after the preset and the
view policy (:func:`apply_settings`), and uses ``views.mean`` / ``views.std`` in the evaluation
transform, so probes, the kNN monitor and exported backbones see what training saw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

# views.aug keys: AugParams fields (sslray.datasets.views) and the four entries of its ``jitter``.
PROBABILITIES = ("hflip_p", "jitter_p", "grey_p", "blur_p", "solarize_p")
JITTER = ("brightness", "contrast", "saturation", "hue")  # AugParams.jitter, in this order
AUG_KEYS = {
    "hflip_p": "probability of a horizontal flip",
    "jitter": "[brightness, contrast, saturation, hue] colour jitter strengths",
    "brightness": "brightness factor drawn from [1 - x, 1 + x]",
    "contrast": "contrast factor drawn from [1 - x, 1 + x]",
    "saturation": "saturation factor drawn from [1 - x, 1 + x]",
    "hue": "hue shift drawn from [-x, x] turns, x in [0, 0.5]",
    "jitter_p": "probability of the colour jitter",
    "grey_p": "probability of greyscale",
    "blur_p": "probability of Gaussian blur",
    "blur_sigma": "[low, high] blur sigma, px of the crop",
    "solarize_p": "probability of solarize",
    "ratio": "[low, high] aspect ratio of the random-resized crop",
}
# AugParams fields other views keys own: an override there names the key to use instead.
OWNED = {"size": "views.crop_size / views.local_size", "scale": "views.min_scale", "mean": "views.mean",
         "std": "views.std", "policies": "views.policy"}
# What views.aug may change in presets whose views keep the whole image (VICRegL): the method draws
# the crops, flips, blur and solarize itself, so only the colour steps made here can change.
WHOLE_IMAGE_KEYS = ("jitter", "brightness", "contrast", "saturation", "hue", "jitter_p", "grey_p")
WHOLE_IMAGE_PRESETS = ("vicregl",)


def _error(msg: str) -> Exception:
    from .config import ConfigError  # here: config.py imports this module when a ViewConfig is made

    return ConfigError(msg)


def _number(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _error(f"config key {key!r}: expected a finite number, got {v!r}")
    return float(v)


def _numbers(value: Any, n: int, key: str) -> tuple[float, ...]:
    """``n`` finite numbers from a list or from text such as ``0.5,0.5,0.5`` (a command line's value)."""
    if isinstance(value, str):
        value = [v for v in value.strip().strip("[]()").split(",") if v.strip()]
        try:
            value = [float(v) for v in value]
        except ValueError:
            raise _error(f"config key {key!r}: expected {n} numbers, got {value!r}") from None
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise _error(f"config key {key!r}: expected a list of {n} numbers, got {value!r}")
    return tuple(_number(v, key) for v in value)


def check_stats(value: Any, key: str, std: bool) -> tuple[float, ...]:
    """``views.mean`` / ``views.std``: empty (the size rule) or 3 per-channel (R, G, B) numbers for
    pixels scaled to [0, 1]: means in [0, 1], stds in (0, 1]."""
    if value is None or (isinstance(value, (str, list, tuple)) and len(value) == 0):
        return ()
    out = _numbers(value, 3, key)
    lo_ok = (lambda v: v > 0) if std else (lambda v: v >= 0)
    if not all(lo_ok(v) and v <= 1 for v in out):
        hint = " (0-255 statistics? divide them by 255: pixels are scaled to [0, 1] before normalising)" \
            if any(v > 1 for v in out) else ""
        want = "in (0, 1]" if std else "in [0, 1]"
        raise _error(f"config key {key!r}: each of the 3 values must be {want}, got {list(value)!r}{hint}")
    return out


def check_aug(value: Any, key: str = "views.aug") -> dict[str, Any]:
    """``views.aug``: a mapping of ``AUG_KEYS`` to values, each checked against its natural range."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _error(f"config key {key!r} must be a mapping of op settings, e.g. {{grey_p: 0.0, hue: 0.0}}; "
                     f"got {value!r}")
    out: dict[str, Any] = {}
    for name, v in value.items():
        k = f"{key}.{name}"
        if name in OWNED:
            raise _error(f"config key {k!r}: set {OWNED[name]} instead")
        if name not in AUG_KEYS:
            raise _error(f"unknown config key {k!r}; known in {key}: {', '.join(AUG_KEYS)}")
        if name in PROBABILITIES:
            out[name] = _number(v, k)
            if not 0 <= out[name] <= 1:
                raise _error(f"config key {k!r}: a probability must be in [0, 1], got {v!r}")
        elif name in JITTER:
            out[name] = _check_jitter(name, _number(v, k), k)
        elif name == "jitter":
            out[name] = tuple(_check_jitter(n, x, k) for n, x in zip(JITTER, _numbers(v, 4, k)))
        else:  # blur_sigma, ratio: a (low, high) range of positive numbers
            lo, hi = _numbers(v, 2, k)
            if not 0 < lo <= hi:
                raise _error(f"config key {k!r}: expected [low, high] with 0 < low <= high, got {v!r}")
            out[name] = (lo, hi)
    return out


def _check_jitter(name: str, v: float, key: str) -> float:
    top = 0.5 if name == "hue" else math.inf  # a hue shift of more than half a turn wraps around
    if not 0 <= v <= top:
        raise _error(f"config key {key!r}: the {name} strength must be {'in [0, 0.5]' if top < 1 else '0 or more'}, "
                     f"got {v!r}")
    return v


def check_views(vc) -> dict[str, Any]:
    """A ``ViewConfig``'s ``mean``, ``std`` and ``aug``, checked and normalised (tuples, floats)."""
    mean, std = check_stats(vc.mean, "views.mean", False), check_stats(vc.std, "views.std", True)
    if bool(mean) != bool(std):
        raise _error("config keys 'views.mean' and 'views.std' go together: set both (3 numbers each) or neither")
    aug = check_aug(vc.aug)
    if vc.preset in WHOLE_IMAGE_PRESETS:
        bad = sorted(set(aug) - set(WHOLE_IMAGE_KEYS))
        if bad or mean:
            keys = ", ".join([f"views.aug.{b}" for b in bad] + (["views.mean / views.std"] if mean else []))
            raise _error(f"config key(s) {keys} do not apply to views.preset={vc.preset!r}: the method draws the "
                         f"crops, flips, blur and solarize itself with the preset's normalisation; views.aug may set "
                         f"{', '.join(WHOLE_IMAGE_KEYS)} there")
    return {"mean": mean, "std": std, "aug": aug}


def apply_settings(spec: list, cfg) -> list:
    """``[(AugParams, count), ...]`` with ``views.mean`` / ``views.std`` and the ``views.aug`` values on
    every view, global and local. A preset's per-view differences (BYOL's blur 1.0 / 0.1, solarize
    0 / 0.2) in an overridden key give way to the one value; keys not named keep them. ``jitter``
    is applied before its single entries (``hue`` ...), so ``{jitter: [...], hue: 0}`` sets both."""
    mean, std, aug = getattr(cfg, "mean", ()), getattr(cfg, "std", ()), getattr(cfg, "aug", None) or {}
    if not mean and not aug:
        return list(spec)
    out = []
    for p, n in spec:
        if mean:
            p = replace(p, mean=tuple(mean), std=tuple(std))
        plain = {k: v for k, v in aug.items() if k not in JITTER}
        if plain:
            p = replace(p, **{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in plain.items()})
        if any(k in aug for k in JITTER):
            p = replace(p, jitter=tuple(float(aug.get(k, j)) for k, j in zip(JITTER, p.jitter)))
        out.append((p, n))
    return out


__all__ = ["AUG_KEYS", "JITTER", "PROBABILITIES", "WHOLE_IMAGE_KEYS", "apply_settings", "check_aug", "check_stats",
           "check_views"]
