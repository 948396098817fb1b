"""Synthetic BraTS-like brain-tumour cases painted onto real anatomy (the "phantom").

Why a phantom: real BraTS data cannot be redistributed, yet every notebook, test and demo of the
kit needs four co-registered MRI modalities with ET/TC/WT labels. The phantom gives that in about a
second per case, deterministically from a seed, in the BraTS 2020/2021 file layout so that the very
same loader (:mod:`lckd_kit.data`) reads real and synthetic data. Design, MRI sources and the
calibration against real-scan results: ``docs/phantoms.md``.

How a case is made (the anatomy is :mod:`lckd_kit.anatomy`, the signals :mod:`lckd_kit.contrast`):
a tumour centre in deep white matter; a randomly rotated ellipsoidal radius field with irregular
borders; oedema (ED) that follows white matter; a core (TC) of enhancing rim (ET), necrosis (NCR)
and non-enhancing patches (NET), cleaned so that ET ⊂ TC ⊂ WT; optional mass effect; about 15 %
low-grade-like cases without enhancement. The images: the signal table with partial volume,
per-case jitter, texture, confounders (enhancing vessels, choroid-plexus-like spots), PSF blur, a
bias field per modality, Rician noise, background exactly 0, int16 on a 0..~1000 scale.
``cues`` (default 1, calibrated against real-scan results) sets how much the modalities other
than T1ce (for ET) and FLAIR (for the oedema) reveal; ``cues=0`` reproduces generator version 2.
T1ce stays the best single modality for ET and TC, FLAIR for WT -- which is what makes LCKD's
teacher election meaningful.

Public API::

    case = make_case(seed=3)                 # dict: image (4,X,Y,Z) int16, label (X,Y,Z) uint8, ...
    case = make_case(3, cues=0.0)            # the previous generation's contrasts
    case = make_case(3, geometry="brats")    # 240 x 240 x 155 at 1 mm, LPS, like a BraTS volume
    write_case(case, "out", "PhantomBraTS_000")
    paths = generate("out", n=20, seed=0)    # PhantomBraTS_000 ... _019 + a small manifest
    root = ensure_phantoms(20, seed=0)       # same, into a cache folder, generated once

The file layout of a written case (names, label values per convention) and :func:`write_case` are
:mod:`lckd_kit.phantom_files`, re-exported here.

These are synthetic images. They are not patients and are not for clinical use.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import MODALITIES
from .anatomy import (BASE_GRID, BRATS_AFFINE, BRATS_BRAIN_CENTRE_VOX, BRATS_SHAPE, GEOMETRIES, PRIOR_FILE,  # noqa: F401
                      TissuePrior, brain_depth, brats_space, load_prior, normalise_shape, smooth_noise,
                      to_brats_volume)
from .contrast import (DIFFICULTIES, ED_BORDER, ED_BORDER_V2, EFFACEMENT, LABEL_SLACK_MM, SIGNAL,  # noqa: F401
                       SIGNAL_V2, check_cues, ed_border, signal_table)
from .paths import data_samples_dir, default_cache_dir  # noqa: F401  (part of this module's API)
from .phantom_files import (LABEL_STYLES, MANIFEST, case_complete, case_file_names, check_label_style,  # noqa: F401
                            cues_tag, write_case)

__all__ = ["GENERATOR_VERSION", "LABEL_STYLES", "GEOMETRIES", "make_case", "write_case", "generate", "case_seed",
           "is_lgg_like", "case_file_names", "ensure_phantoms", "cues_tag",
           # re-exported from anatomy, contrast and paths
           "PRIOR_FILE", "TissuePrior", "load_prior", "brain_depth", "smooth_noise", "SIGNAL", "SIGNAL_V2",
           "ED_BORDER", "ED_BORDER_V2", "EFFACEMENT", "DIFFICULTIES", "signal_table", "ed_border",
           "data_samples_dir", "default_cache_dir"]

#: Bump when the generator changes its output; cached phantom sets are regenerated then.
#: 3: cross-modal cues (the ``cues`` knob), BraTS-space geometry.
GENERATOR_VERSION = 3

#: Correlation length (Gaussian sigma, mm) of the within-tissue texture.
TEXTURE_SIGMA_MM = 3.0

# internal tissue codes of the tumour map (0 = healthy / background)
_ED, _NCR, _ET, _NET = 1, 2, 3, 4



def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random 3x3 rotation (QR of a Gaussian matrix with the sign fix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# --------------------------------------------------------------------------------------------
# tumour geometry
# --------------------------------------------------------------------------------------------
def _world_axes(affine: np.ndarray, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """mm coordinate of each voxel index along x, y, z (axis-aligned affine): three 1-D arrays."""
    return [affine[k, k] * np.arange(shape[k], dtype=np.float32) + affine[k, 3] for k in range(3)]


def _pick_centre(rng: np.random.Generator, prior: TissuePrior, depth: np.ndarray, z_min_mm: float = -5.0) -> np.ndarray:
    """Tumour centre (mm, (3,)): a random voxel in deep white matter, supratentorial.

    WM probability > 0.6 and >= 14 mm inside the brain (``depth``: distance to the outside of the
    brain, mm); additionally z > ``z_min_mm`` (-5 mm in MNI space) because adult gliomas are
    mostly supratentorial (this keeps them out of the cerebellum).
    """
    gm, wm, csf = prior.probs
    z_mm = _world_axes(prior.affine, wm.shape)[2]
    ok = (wm > 0.6) & (depth >= 14.0) & (z_mm[None, None, :] > z_min_mm)
    if not ok.any():  # very coarse grids: relax to the deepest white matter available
        ok = (wm > 0.5) & (depth >= 0.5 * depth.max())
    candidates = np.argwhere(ok)
    vox = candidates[rng.integers(len(candidates))]
    return nib.affines.apply_affine(prior.affine, vox).astype(np.float32)


def _mass_effect(probs: np.ndarray, affine: np.ndarray, brain: np.ndarray, centre: np.ndarray,
                 r_tc: float, r_wt: float) -> np.ndarray:
    """Push the anatomy away from the tumour: probs'(x) = probs(x - u(x)) -> (3, X, Y, Z) float32.

    u(x) = 0.3 R_tc exp(-|x-c|^2 / 2 R_wt^2) (x-c)/|x-c|, so ventricles and
    sulci next to the tumour are compressed, as in real glioblastoma. Only brain voxels are
    resampled (outside stays 0): a quarter of the grid, a quarter of the cost.
    """
    vox = np.nonzero(brain)
    sp = np.diag(affine)[:3].astype(np.float32)
    pos = [affine[k, 3] + sp[k] * vox[k].astype(np.float32) for k in range(3)]  # mm
    d = [pos[k] - centre[k] for k in range(3)]
    dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-6
    mag = 0.3 * r_tc * np.exp(-(dist**2) / (2.0 * r_wt**2)) / dist
    coords = np.stack([(pos[k] - mag * d[k] - affine[k, 3]) / sp[k] for k in range(3)])
    out = np.zeros_like(probs)
    for c, p in enumerate(probs):
        out[c][vox] = ndimage.map_coordinates(p, coords, order=1, mode="nearest")
    return out


def _largest_component(mask: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Keep one 26-connected component of ``mask``: the largest, or the one with most ``weight``."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return mask.copy()
    score = np.bincount(lab.ravel(), weights=None if weight is None else weight.ravel().astype(np.float64))
    score[0] = -1
    if weight is not None and score[1:].max() <= 0:  # nothing to anchor on: fall back to size
        score = np.bincount(lab.ravel())
        score[0] = -1
    return lab == int(np.argmax(score))


def _tumour_map(rng: np.random.Generator, probs: np.ndarray, brain: np.ndarray, affine: np.ndarray,
                centre: np.ndarray, geom: dict) -> tuple[np.ndarray, np.ndarray]:
    """Paint the tumour (shape, topology, the low-grade-like variant).

    Returns ``tissue`` (X, Y, Z) uint8 with codes 0 healthy, _ED, _NCR, _ET, _NET (ET ⊂ TC ⊂ WT
    guaranteed by construction and cleanup) and ``ed_ramp`` (X, Y, Z) float32: 0 at the WT border
    rising to 1 at geom["fade_mm"] inside; the oedema blend weight is
    ``border + (1 - border) * ed_ramp`` with a per-modality ``border`` (:func:`ed_border`).
    """
    shape = brain.shape
    sp = np.abs(np.diag(affine)[:3])
    gm, wm, csf = probs
    ax = _world_axes(affine, shape)
    d = [ax[k].reshape([-1 if j == k else 1 for j in range(3)]) - centre[k] for k in range(3)]
    rot, axes_scale = geom["rotation"], geom["axes"]
    # ellipsoidal radius field r(x) = |R^T (x - c) / a| in mm
    r2 = np.zeros(shape, np.float32)
    for k in range(3):
        u = rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]
        r2 += (u / axes_scale[k]) ** 2
    r = np.sqrt(r2)

    mean_sp = float(sp.mean())
    n1 = np.clip(smooth_noise(rng, shape, 8.0 / mean_sp), -2, 2)
    n2 = np.clip(smooth_noise(rng, shape, 6.0 / mean_sp), -1.5, 2)  # -1.5: no runaway fingers (r / 0.55 at most)
    n_net = smooth_noise(rng, shape, 3.0 / mean_sp)
    r_tc = r * (1.0 + 0.18 * n1)
    r_wt = r * (1.0 + 0.30 * n2)

    tc = (r_tc < geom["R_tc"]) & brain
    ed_allowed = brain & (csf < 0.5) & (wm + 0.3 * gm > 0.5)  # oedema tracks white matter, spares cortex
    wt = ((r_wt < geom["R_wt"]) & ed_allowed) | tc

    # topology: one TC component (islands become oedema), one WT component (the one holding TC)
    tc = _largest_component(tc)
    wt = _largest_component(wt | tc, weight=tc) | tc

    tissue = np.zeros(shape, np.uint8)
    tissue[wt] = _ED
    if geom["lgg_like"]:
        tissue[tc] = _NET  # low-grade-like: no enhancement, TC = non-enhancing tumour only
    else:
        tissue[tc] = _ET
        tissue[tc & (r_tc < geom["R_ncr"])] = _NCR
        tissue[(tissue == _ET) & (n_net > 1.3)] = _NET

    # oedema fades towards its outer border (distance to the outside of WT, in mm)
    depth = np.zeros(shape, np.float32)
    if wt.any():  # the distance transform only needs WT's bounding box (+1 voxel of outside)
        idx = np.argwhere(wt)
        box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(idx.min(0), idx.max(0)))
        depth[box] = ndimage.distance_transform_edt(wt[box], sampling=sp)
    ed_ramp = np.clip((depth - 0.5 * mean_sp) / geom["fade_mm"], 0.0, 1.0)
    return tissue, ed_ramp.astype(np.float32)


def _lgg_decision(rng: np.random.Generator, no_et_fraction: float) -> bool:
    """The low-grade-like decision: True with probability ``no_et_fraction``."""
    return bool(rng.random() < no_et_fraction)


def is_lgg_like(seed: int, no_et_fraction: float = 0.15) -> bool:
    """Whether ``make_case(seed, no_et_fraction=...)`` is low-grade-like (no ET), without making it.

    The decision is the first draw of the case's generator, so this costs microseconds.
    """
    return _lgg_decision(np.random.default_rng(seed), no_et_fraction)


def _shape_axes(rng: np.random.Generator) -> np.ndarray:
    """Ellipsoid axis factors a ~ U(0.75, 1.25)^3, rescaled to geometric mean 1 -> (3,) float32.

    The rescaling makes the axes change the tumour's shape but not its volume, which R_tc / R_wt
    control; without it the volume factor ranges 0.42-1.95 and WT overshoots real sizes.
    """
    a = rng.uniform(0.75, 1.25, size=3)
    return (a / np.prod(a) ** (1.0 / 3.0)).astype(np.float32)


def _draw_geometry(rng: np.random.Generator, no_et_fraction: float) -> dict:
    """Random tumour parameters (mm) and the LGG-like decision.

    The LGG decision must stay the generator's first draw (see :func:`is_lgg_like`).
    """
    lgg_like = _lgg_decision(rng, no_et_fraction)
    r_tc = float(rng.uniform(12.0, 22.0))
    return dict(
        lgg_like=lgg_like,
        R_tc=r_tc,
        R_ncr=r_tc - float(rng.uniform(3.0, 7.0)),
        R_wt=r_tc + float(rng.uniform(6.0, 18.0)),
        axes=_shape_axes(rng),
        rotation=_random_rotation(rng).astype(np.float32),
        fade_mm=float(rng.uniform(4.0, 10.0)),
    )


# --------------------------------------------------------------------------------------------
# confounders: bright-on-T1ce structures that are not tumour
# --------------------------------------------------------------------------------------------
def _confounders(rng: np.random.Generator, probs: np.ndarray, brain: np.ndarray, depth: np.ndarray,
                 affine: np.ndarray, keep_out: np.ndarray, n_vessels: int, n_plexus: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of enhancing vessels and choroid-plexus-like spots, outside ``keep_out``.

    Returns (vessel_weight, plexus_weight), (X, Y, Z) float32 in [0, 1]: blend weights of the
    ``SIGNAL["vessel"]`` / ``SIGNAL["plexus"]`` rows over the healthy signal. They make a bright
    T1ce spot insufficient evidence for ET, so all-modality segmentation is not trivially easy.
    """
    shape = brain.shape
    sp = np.abs(np.diag(affine)[:3])
    gm, wm, csf = probs
    allowed = brain & ~keep_out
    vessel = np.zeros(shape, np.float32)
    plexus = np.zeros(shape, np.float32)

    # vessels: smooth random walks starting in superficial sulci/cortex (cortical veins)
    starts = np.argwhere(allowed & (depth < 15.0) & (depth > 2.0) & (gm + csf > 0.6))
    step_mm = 0.5 * float(sp.min())
    for _ in range(n_vessels if len(starts) else 0):
        pos = starts[rng.integers(len(starts))] * sp  # mm in voxel-aligned frame
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        radius = float(rng.uniform(0.8, 1.5))
        weight = min(1.0, 2.0 * radius / float(sp.min()))  # sub-voxel vessels are partial volume
        for _ in range(int(rng.uniform(20.0, 60.0) / step_mm)):
            vox = np.rint(pos / sp).astype(int)
            if np.any(vox < 0) or np.any(vox >= shape) or not allowed[tuple(vox)]:
                break
            vessel[tuple(vox)] = weight
            direction = direction + rng.normal(0.0, 0.15, 3)
            direction /= np.linalg.norm(direction)
            pos = pos + step_mm * direction
    # choroid plexus: small blobs inside deep CSF (ventricles), away from the tumour
    seeds = np.argwhere(allowed & (csf > 0.6) & (depth > 25.0))
    if n_plexus and len(seeds):
        ax = _world_axes(np.diag(np.append(sp, 1.0)), shape)
        for _ in range(n_plexus):
            c = seeds[rng.integers(len(seeds))] * sp
            rad = float(rng.uniform(2.0, 4.0))
            d2 = sum((ax[k].reshape([-1 if j == k else 1 for j in range(3)]) - c[k]) ** 2 for k in range(3))
            blob = np.clip(1.0 - (np.sqrt(d2) - rad) / float(sp.min()), 0.0, 1.0) * allowed
            plexus = np.maximum(plexus, blob.astype(np.float32))
    return vessel, plexus


# --------------------------------------------------------------------------------------------
# the case
# --------------------------------------------------------------------------------------------
def _labels_from_tissue(tissue: np.ndarray, label_style: str) -> np.ndarray:
    """Internal tissue codes -> BraTS labels (X, Y, Z) uint8 of ``label_style``."""
    ncr_net, ed, et = LABEL_STYLES[label_style]["labels"]
    lut = np.zeros(256, np.uint8)
    lut[_ED], lut[_NCR], lut[_NET], lut[_ET] = ed, ncr_net, ncr_net, et
    return lut[tissue]


def make_case(seed: int, grid: int | Sequence[int] = 96, difficulty: str = "standard",
              no_et_fraction: float = 0.15, mass_effect: bool = True, label_style: str = "brats2018",
              cues: float = 1.0, geometry: str = "mni") -> dict:
    """Generate one synthetic case, deterministically from ``seed``.

    Parameters
    ----------
    seed : the only source of randomness (``np.random.default_rng(seed)``); same seed, same case.
    grid : 96 -> 96^3 at 2 mm; n -> n^3 at 192/n mm (32 -> 6 mm, for fast tests).
    difficulty : "easy", "standard" or "hard" (see :data:`DIFFICULTIES`).
    no_et_fraction : probability that the case is low-grade-like (no enhancing tumour).
    mass_effect : push the anatomy away from the tumour.
    label_style : "brats2018" (labels 0,1,2,4) or "brats2023" (0,1,2,3).
    cues : how much the modalities other than T1ce (for the enhancing tumour) and FLAIR (for the
        oedema) reveal of the tumour, a float >= 0. 0 reproduces generator version 2 (tumour
        hardly visible on T1, oedema looking like grey matter on T1/T1ce); 1 (default) is
        calibrated so that a model trained on phantoms learns a 15-subset Dice table close to
        models trained on real BraTS scans; above 1 the cross-modal contrasts grow further
        (signals clipped to their valid range). The labels do not depend on ``cues``.
    geometry : "mni" (default): the ``grid`` above, RAS, MNI mm. "brats": the grid of real BraTS
        volumes, 240 x 240 x 155 voxels of 1 mm in LPS orientation (SRI24 space, affine
        :data:`BRATS_AFFINE`), the anatomy scaled to a BraTS-sized brain and placed where a BraTS
        brain sits (``grid`` must stay at its default). Tumour sizes are in mm in both.

    Returns a dict:
      ``image`` (4, X, Y, Z) int16, MODALITIES order, 0 outside the brain, ~0..1000 inside;
      ``label`` (X, Y, Z) uint8 in ``label_style``; ``affine`` (4, 4) (RAS for "mni", LPS for
      "brats"); ``spacing`` (3,) mm;
      ``brain`` (X, Y, Z) bool; ``has_et`` bool; ``lgg_like`` bool;
      ``volumes`` {"ET", "TC", "WT"} in cm^3; ``label_style``; ``params`` (the drawn parameters).
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    check_label_style(label_style)
    cues = check_cues(cues)
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    knobs = DIFFICULTIES[difficulty]
    rng = np.random.default_rng(seed)
    if geometry == "brats":
        if normalise_shape(grid) != (BASE_GRID,) * 3:
            raise ValueError("geometry='brats' has its own grid (240 x 240 x 155 at 1 mm): leave grid at its default")
        space = brats_space()
        prior, depth_map, z_min = space.prior, space.depth, space.z_min_mm
    else:
        prior = load_prior(grid)
        depth_map, z_min = brain_depth(prior.probs.shape[1:]), -5.0
    affine = np.array(prior.affine)
    sp = prior.spacing
    shape = prior.probs.shape[1:]

    geom = _draw_geometry(rng, no_et_fraction)
    centre = _pick_centre(rng, prior, depth_map, z_min)
    brain = prior.brain  # the skull-stripping mask is not moved by the tumour
    if mass_effect:
        probs = _mass_effect(prior.probs, affine, brain, centre, geom["R_tc"], geom["R_wt"])
    else:
        probs = prior.probs * brain
    tissue, ed_ramp = _tumour_map(rng, probs, brain, affine, centre, geom)
    # what the images show: the labelled tumour, its boundaries displaced a little (rater slack)
    slack = min(cues, 1.0)
    cue_rng = np.random.default_rng([int(seed) % 2**63, 0xC0E5])  # own stream: the v2 draws stay intact
    if slack > 0:
        image_tissue, image_ramp = _label_slack(cue_rng, tissue, ed_ramp, sp,
                                                {k: v * slack for k, v in LABEL_SLACK_MM.items()})
    else:
        image_tissue, image_ramp = tissue, ed_ramp

    n_vessels = int(rng.integers(knobs["vessels"][0], knobs["vessels"][1] + 1))
    n_plexus = int(rng.integers(knobs["plexus"][0], knobs["plexus"][1] + 1))
    keep_out = ndimage.binary_dilation(tissue > 0, iterations=max(1, int(round(4.0 / sp.mean()))))
    vessel_w, plexus_w = _confounders(rng, probs, brain, depth_map, affine, keep_out, n_vessels, n_plexus)

    # Image formation works on the brain voxels only (1-D arrays, ~27 % of the grid); the
    # background is exactly 0 anyway. Healthy partial-volume weights are renormalised so that the
    # brain edge is not darkened artificially (BraTS is skull-stripped with a sharp edge).
    inside = np.nonzero(brain)
    pv = probs[(slice(None),) + inside]
    pv = pv / np.maximum(pv.sum(0, keepdims=True), 1e-3)
    efface = min(EFFACEMENT * cues, 0.95)
    if efface > 0:
        pv = _efface_sulci(pv, inside, affine, centre, geom["R_wt"], efface)
    tis = image_tissue[inside]
    ramp = image_ramp[inside]
    is_ed = tis == _ED
    is_tumour = (tis > 0).astype(np.float32)
    texture_sd = np.where(tis == _ET, max(knobs["texture"], 0.10), knobs["texture"]).astype(np.float32)
    vessel_w, plexus_w = vessel_w[inside], plexus_w[inside]
    mean_sp = float(sp.mean())
    table = signal_table(cues)
    border = ed_border(cues)
    image = np.zeros((len(MODALITIES),) + tuple(shape), np.int16)
    full = np.zeros(shape, np.float32)
    edge_fill = slack if slack > 0 else None  # 0 at cues=0: version 2's darkened edge
    edge_norm = np.maximum(ndimage.gaussian_filter(brain.astype(np.float32), 0.6)[inside], 0.05)
    for m in range(len(MODALITIES)):
        jitter = rng.uniform(0.9, 1.1, size=len(table))  # per case, modality and tissue
        sig = {name: row[m] * j for (name, row), j in zip(table.items(), jitter)}
        healthy = pv[0] * sig["gm"] + pv[1] * sig["wm"] + pv[2] * sig["csf"]
        lut = np.zeros(5, np.float32)  # tumour signal indexed by tissue code (0 unused: weight 0)
        lut[_ED], lut[_NCR], lut[_ET], lut[_NET] = sig["ed"], sig["ncr"], sig["et"], sig["net"]
        b = float(border[m])
        ed_w = b + (1.0 - b) * ramp  # oedema fades towards the WT border, per modality
        tumour_w = np.where(is_ed, ed_w, is_tumour) * knobs["contrast"]
        signal = healthy + tumour_w * (lut[tis] - healthy)
        signal += vessel_w * (sig["vessel"] - signal)
        signal += plexus_w * (sig["plexus"] - signal)
        signal *= 1.0 + texture_sd * smooth_noise(rng, shape, TEXTURE_SIGMA_MM / mean_sp)[inside]

        full[inside] = signal
        signal = ndimage.gaussian_filter(full, 0.6)[inside]  # PSF
        if edge_fill is not None:
            # the scanner blurred brain into CSF and skull, not into the black background that
            # skull stripping left: blur within the brain only (version 2 let the outside darken the
            # edge, which turned the small brain islands of the top and bottom slices into rings)
            signal = (1.0 - edge_fill) * signal + edge_fill * signal / edge_norm
        signal *= np.exp(knobs["bias"] * smooth_noise(rng, shape, 40.0 / mean_sp)[inside])  # bias field
        sigma = knobs["noise"] * float(signal.mean())
        e1 = rng.standard_normal(signal.shape, dtype=np.float32)
        e2 = rng.standard_normal(signal.shape, dtype=np.float32)
        signal = np.sqrt((signal + sigma * e1) ** 2 + (sigma * e2) ** 2)  # Rician magnitude
        gain = 1000.0 * rng.uniform(0.85, 1.15)  # raw scanner units are arbitrary per case
        image[m][inside] = np.clip(np.rint(signal * gain), 1, 32767)  # >= 1 inside: non-zero == brain

    label = _labels_from_tissue(tissue, label_style)
    voxel_cm3 = float(np.prod(sp)) / 1000.0
    n_et = int((tissue == _ET).sum())
    n_tc = int(np.isin(tissue, (_NCR, _ET, _NET)).sum())
    n_wt = int((tissue > 0).sum())
    grid_out = list(shape)
    if geometry == "brats":  # working box -> the full BraTS volume, LPS
        image, label, brain = (to_brats_volume(a, space.lo) for a in (image, label, brain))
        affine, grid_out = BRATS_AFFINE.copy(), list(BRATS_SHAPE)
    return dict(
        image=image,
        label=label,
        affine=affine,
        spacing=sp,
        brain=brain,
        has_et=n_et > 0,
        lgg_like=geom["lgg_like"],
        volumes=dict(ET=n_et * voxel_cm3, TC=n_tc * voxel_cm3, WT=n_wt * voxel_cm3),
        label_style=label_style,
        params=dict(
            seed=int(seed), grid=grid_out, geometry=geometry, difficulty=difficulty, no_et_fraction=float(no_et_fraction),
            mass_effect=bool(mass_effect), centre_mm=[round(float(c), 1) for c in centre],
            R_tc=round(geom["R_tc"], 2), R_ncr=round(geom["R_ncr"], 2), R_wt=round(geom["R_wt"], 2),
            n_vessels=n_vessels, n_plexus=n_plexus, cues=cues, generator_version=GENERATOR_VERSION,
        ),
    )


def _label_slack(rng: np.random.Generator, tissue: np.ndarray, ed_ramp: np.ndarray, sp: np.ndarray,
                 amp_mm: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The tumour as the image shows it: ``tissue`` and ``ed_ramp`` displaced by smooth random fields.

    The core layout (NCR/ET/NET) moves with one field (RMS ``amp_mm["core"]`` per axis), the
    whole-tumour outline with another (``amp_mm["wt"]``), both with 6 mm correlation; the core
    stays inside the whole tumour. Only the tumour's bounding box (plus a margin) is resampled.
    """
    if not tissue.any():
        return tissue, ed_ramp
    margin = int(np.ceil(4.0 * max(amp_mm.values()) / sp.min())) + 1
    idx = np.argwhere(tissue > 0)
    box = tuple(slice(max(lo - margin, 0), hi + margin + 1) for lo, hi in zip(idx.min(0), idx.max(0)))
    t, ramp = tissue[box], ed_ramp[box]
    shape = t.shape
    grid = np.indices(shape, dtype=np.float32)
    sigma = 6.0 / float(sp.mean())

    def coords(amp):
        return [grid[k] + (amp / sp[k]) * smooth_noise(rng, shape, sigma) for k in range(3)]

    c_core = coords(amp_mm["core"])
    c_wt = coords(amp_mm["wt"])
    core = ndimage.map_coordinates(t, c_core, order=0, mode="nearest")
    core[core == _ED] = 0
    wt = ndimage.map_coordinates(t, c_wt, order=0, mode="nearest") > 0
    out_t = tissue.copy()
    out_t[box] = np.where(core > 0, core, np.where(wt, _ED, 0)).astype(tissue.dtype)
    out_r = ed_ramp.copy()
    out_r[box] = ndimage.map_coordinates(ramp, c_wt, order=1, mode="nearest")
    return out_t, out_r


def _efface_sulci(pv: np.ndarray, inside: tuple, affine: np.ndarray, centre: np.ndarray, r_wt: float,
                  amount: float) -> np.ndarray:
    """Sulcal effacement: near the tumour part of the CSF partial volume becomes grey matter.

    ``pv`` (3, n) gm/wm/csf weights of the brain voxels ``inside``; the squeezed fraction is
    ``amount * exp(-|x-c|^2 / 2 R_wt^2)``, so sulci narrow around the tumour and recover
    further away. Image formation only: the labels (drawn from the uncompressed CSF) do not change.
    """
    sp = np.diag(affine)[:3]
    d2 = sum((affine[k, 3] + sp[k] * inside[k].astype(np.float32) - centre[k]) ** 2 for k in range(3))
    squeeze = (amount * np.exp(-d2 / (2.0 * r_wt**2))).astype(np.float32) * pv[2]
    out = pv.copy()
    out[2] -= squeeze
    out[0] += squeeze
    return out


# --------------------------------------------------------------------------------------------
# sets of cases (the file layout, write_case and the manifest's name: lckd_kit.phantom_files)
# --------------------------------------------------------------------------------------------
def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in a set made with ``seed``: independent streams via SeedSequence."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def generate(out_dir: str | os.PathLike, n: int, seed: int = 0, grid: int = 96, difficulty: str = "standard",
             no_et_fraction: float = 0.15, mass_effect: bool = True, label_style: str = "brats2018",
             prefix: str = "PhantomBraTS", progress: bool = True, cues: float = 1.0,
             geometry: str = "mni") -> list[Path]:
    """Write ``n`` cases ``<prefix>_000`` ... into ``out_dir``; return their folders.

    Case ``i`` uses seed :func:`case_seed` (seed, i). A small manifest (``phantom_manifest.json``)
    records the parameters: cases already present with identical parameters are skipped, any
    parameter change (or a new GENERATOR_VERSION) regenerates them, and cases listed in an old
    manifest beyond ``n`` are removed so the folder holds exactly the set asked for. ``cues``: see
    :func:`make_case` (recorded in the manifest; a different value regenerates the cases).
    """
    from tqdm.auto import tqdm

    check_label_style(label_style)
    cues = check_cues(cues)
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(generator_version=GENERATOR_VERSION, seed=int(seed), grid=normalise_shape(grid),
                  difficulty=difficulty, no_et_fraction=float(no_et_fraction), mass_effect=bool(mass_effect),
                  label_style=label_style, prefix=prefix, cues=cues)
    params["grid"] = list(params["grid"])
    if geometry != "mni":  # keeps the manifests of the default geometry as they were
        params["geometry"] = geometry
    manifest_path = out_dir / MANIFEST
    old = {}
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = {}
    same = old.get("params") == params
    names = [f"{prefix}_{i:03d}" for i in range(n)]
    for stale in set(old.get("cases", {})) - set(names):
        if (out_dir / stale).is_dir():  # only folders this function wrote (listed in its manifest)
            shutil.rmtree(out_dir / stale)

    paths = []
    done: dict[str, dict] = {}
    for i, name in enumerate(tqdm(names, desc="phantoms", unit="case", disable=not progress)):
        s = case_seed(seed, i)
        if same and name in old.get("cases", {}) and case_complete(out_dir, name, label_style):
            done[name] = old["cases"][name]
        else:
            case = make_case(s, grid=grid, difficulty=difficulty, no_et_fraction=no_et_fraction,
                             mass_effect=mass_effect, label_style=label_style, cues=cues, geometry=geometry)
            write_case(case, out_dir, name, label_style)
            done[name] = dict(seed=s, has_et=case["has_et"],
                              volumes_cm3={k: round(v, 2) for k, v in case["volumes"].items()})
        paths.append(out_dir / name)
        # rewrite after every case so an interrupted run keeps what it finished
        manifest_path.write_text(json.dumps(dict(params=params, cases=done), indent=1) + "\n")
    return paths


def ensure_phantoms(n: int, seed: int = 0, grid: int = 96, cache_dir: str | os.PathLike | None = None,
                    difficulty: str = "standard", progress: bool = True, cues: float = 1.0,
                    geometry: str = "mni", no_et_fraction: float = 0.15, prefix: str = "PhantomBraTS") -> Path:
    """Folder with ``n`` phantom cases of these parameters, generated on first use (~1 s/case).

    The folder name encodes the parameters (``phantoms_v3_g96_standard_c1_s0_n20``; a non-default
    ``no_et_fraction`` adds ``_lgg0.26``, a non-default ``prefix`` adds itself), so different
    requests never mix; :func:`generate`'s manifest makes repeated calls nearly free.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    g = "x".join(str(s) for s in normalise_shape(grid)) if not isinstance(grid, int) else str(grid)
    if geometry == "brats":
        g = "brats"
    extra = (f"_lgg{no_et_fraction:g}" if no_et_fraction != 0.15 else "") + (f"_{prefix}" if prefix != "PhantomBraTS" else "")
    folder = root / f"phantoms_v{GENERATOR_VERSION}_g{g}_{difficulty}_{cues_tag(cues)}_s{seed}_n{n}{extra}"
    generate(folder, n, seed=seed, grid=grid, difficulty=difficulty, progress=progress, cues=cues, geometry=geometry,
             no_et_fraction=no_et_fraction, prefix=prefix)
    return folder
