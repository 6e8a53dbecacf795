"""View presets beyond SimCLR's (registered into ``sslray.datasets.views.PRESETS``).

Every preset takes ``size, min_scale, jitter_strength, blur`` from ``ViewConfig``; extra keyword
arguments (multi-crop counts and sizes) keep their defaults unless a caller passes them. Each
method's builder names its preset in ``.default_views``; its recipes set ``views.preset`` to it.
"""

from __future__ import annotations

from dataclasses import replace

from .views import (  # noqa: F401
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    AugParams,
    _base,
    local_crop_size,
)


def _small(size: int) -> bool:
    return size <= 64


def _byol_pair(size, min_scale, jitter_strength, blur) -> tuple[AugParams, AugParams]:
    """BYOL's asymmetric pair (Grill et al. 2020, table 6): jitter (0.4, 0.4, 0.2, 0.1) at p=0.8, grey
    0.2; blur p=1.0 / 0.1 and solarize p=0 / 0.2 for view 1 / view 2. ``jitter_strength`` 0.5 gives
    exactly those values; ``blur=False`` (32-px data) turns blur off but keeps the solarize asymmetry."""
    s = jitter_strength / 0.5
    base = replace(_base(size, min_scale, jitter_strength, False, _small(size)),
                   jitter=(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s))
    return (replace(base, blur_p=1.0 if blur else 0.0, solarize_p=0.0),
            replace(base, blur_p=0.1 if blur else 0.0, solarize_p=0.2))


@PRESETS.register("byol")
def byol_views(size=32, min_scale=0.08, jitter_strength=0.5, blur=False, n_local=0, local_size=None,
               local_scale=(0.05, 0.14), **_):
    """BYOL, also MoCo v3, NNCLR, Barlow Twins and VICReg: two asymmetric views.

    ``n_local`` > 0 (BYOL, Barlow Twins and VICReg take them) adds that many local crops (multi-crop,
    Caron et al. 2020, sec. 4) at ``local_size`` (default 96/224 of ``size``), scale ``local_scale``
    (SwAV's (0.05, 0.14)), with the pair's colour jitter and greyscale, blur p=0.5 with ``blur`` and no
    solarize: the local crops of DINO, whose augmentations are BYOL's."""
    v1, v2 = _byol_pair(size, min_scale, jitter_strength, blur)
    spec = [(v1, 1), (v2, 1)]
    if n_local > 0:
        local = replace(v1, size=local_size or local_crop_size(size), scale=tuple(local_scale),
                        blur_p=0.5 if blur else 0.0, solarize_p=0.0)
        spec.append((local, n_local))
    return spec


PRESETS.register("mocov3")(byol_views)  # MoCo v3 uses BYOL's augmentations (Chen et al. 2021, sec. 5)


def _multicrop(size, min_scale, jitter, blur, n_local, local_size, local_min_scale, global_blur, local_blur,
               solarize2):
    """Two global crops and ``n_local`` local ones sharing one colour jitter ``jitter`` (brightness,
    contrast, saturation, hue) at p=0.8 with grey p=0.2; only blur and solarize differ per crop."""
    base = replace(_base(size, min_scale, 0.0, False, _small(size)), jitter=tuple(jitter))
    g1 = replace(base, blur_p=global_blur[0] if blur else 0.0)
    g2 = replace(base, blur_p=global_blur[1] if blur else 0.0, solarize_p=solarize2)
    spec = [(g1, 1), (g2, 1)]
    if n_local > 0:
        local = replace(base, size=local_size or local_crop_size(size), scale=(local_min_scale, min_scale),
                        blur_p=local_blur if blur else 0.0)
        spec.append((local, n_local))
    return spec


@PRESETS.register("dino")
def dino_views(size=32, min_scale=0.4, jitter_strength=0.5, blur=False, n_local=6, local_size=None,
               local_min_scale=0.05, **_):
    """DINO multi-crop (Caron et al. 2021, sec. 3.1 and appendix): 2 global crops at ``size`` with
    scale (min_scale, 1) (0.4 in the paper), blur 1.0 / 0.1, solarize 0 / 0.2; ``n_local`` (6-10) local
    crops at ``local_size`` (default 96/224 of ``size``) with scale (local_min_scale, min_scale), blur 0.5.
    Colour jitter is BYOL's (0.4, 0.4, 0.2, 0.1) at ``jitter_strength`` 0.5, scaled by ``jitter_strength / 0.5``."""
    s = jitter_strength / 0.5
    return _multicrop(size, min_scale, (0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s), blur, n_local, local_size,
                      local_min_scale, (1.0, 0.1), 0.5, 0.2)


@PRESETS.register("swav")
def swav_views(size=32, min_scale=0.14, jitter_strength=1.0, blur=False, n_local=6, local_size=None,
               local_min_scale=0.05, **_):
    """SwAV multi-crop (Caron et al. 2020, sec. 3.2): 2 global crops, scale (0.14, 1), and ``n_local``
    (6 in the paper) local crops at 96/224 of ``size``, scale (0.05, 0.14); blur 0.5 everywhere, no solarize.
    Colour jitter is SimCLR's (0.8s, 0.8s, 0.8s, 0.2s) with s = ``jitter_strength``, as SwAV's code
    (``get_color_distortion(s=1.0)``: ColorJitter(0.8, 0.8, 0.8, 0.2) at p=0.8, grey p=0.2) at s = 1."""
    s = jitter_strength
    return _multicrop(size, min_scale, (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), blur, n_local, local_size,
                      local_min_scale, (0.5, 0.5), 0.5, 0.0)


@PRESETS.register("mae")
def mae_views(size=32, min_scale=0.2, jitter_strength=0.5, blur=False, **_):
    """MAE (He et al. 2022, appendix A.1): one view, random-resized crop (scale 0.2-1) and flip only."""
    base = _base(size, min_scale, jitter_strength, False, _small(size))
    return [(replace(base, jitter_p=0.0, grey_p=0.0, blur_p=0.0, solarize_p=0.0), 1)]


@PRESETS.register("ijepa")
def ijepa_views(size=32, min_scale=0.3, jitter_strength=0.5, blur=False, **_):
    """I-JEPA (Assran et al. 2023, appendix A): one view, random-resized crop (scale 0.3-1) alone: no
    flip and no colour ops (the paper code's ``make_transforms``: ``horizontal_flip=False``)."""
    base = _base(size, min_scale, jitter_strength, False, _small(size))
    return [(replace(base, hflip_p=0.0, jitter_p=0.0, grey_p=0.0, blur_p=0.0, solarize_p=0.0), 1)]


@PRESETS.register("vicregl")
def vicregl_views(size=32, min_scale=0.08, jitter_strength=0.5, blur=False, **_):
    """VICRegL: BYOL's colour jitter and greyscale on the whole image (no crop, no flip). The method
    draws the crops and flips itself so that it knows where every feature-map cell lies in the image
    (``min_scale`` is read there from the config), and then blurs and solarizes the crops
    (:func:`vicregl_tail`): a blur here would be magnified by the crop's resize, up to
    1/sqrt(min_scale) times, and solarize must follow the blur."""
    v1, v2 = _byol_pair(size, min_scale, jitter_strength, blur)
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip_p=0.0, blur_p=0.0, solarize_p=0.0)
    return [(replace(v1, **whole), 1), (replace(v2, **whole), 1)]


def vicregl_tail(size=32, blur=False) -> tuple[AugParams, AugParams]:
    """What ``vicregl_views`` leaves to the method, per view (1, 2): BYOL's pair's blur (p 1.0 / 0.1
    with ``blur``, else 0; sigma in pixels of the crop at network resolution), then its solarize (p 0 /
    0.2), with the views' normalisation. The paper's code (VICRegL ``transforms.py``) also crops first,
    then blurs and solarizes the crop."""
    return _byol_pair(size, 0.08, 0.5, blur)


__all__ = ["byol_views", "dino_views", "ijepa_views", "local_crop_size", "mae_views", "swav_views", "vicregl_tail",
           "vicregl_views"]
