"""Synthetic BraTS-like brain-tumour cases painted onto real anatomy (the "phantom").

Why a phantom: real BraTS data cannot be redistributed, yet every notebook, test and demo of the
kit needs four co-registered MRI modalities with ET/TC/WT labels. The phantom gives that in about a
second per case, deterministically from a seed, in the BraTS 2020/2021 file layout so that the very
same loader (:mod:`lckd_kit.data`) reads real and synthetic data.

How a case is made (design and numbers: ``DATA_SPEC.md`` sections B0-B4 and R):

* **Anatomy** -- GM/WM/CSF probability maps derived from the ICBM152 2009a template (bundled as
  ``data_samples/icbm152_2009a_tissue_prior_96.nii.gz``, 96^3 at 2 mm, RAS). A smaller ``grid``
  keeps the 192 mm field of view and uses coarser voxels, so tumours keep their size in mm.
* **Tumour shape** -- centre in deep white matter; a randomly rotated ellipsoidal radius field with
  borders made irregular by smoothed noise; oedema (ED) that follows white matter; a tumour core
  (TC) made of an enhancing rim (ET), a necrotic centre (NCR) and non-enhancing patches (NET);
  largest-component cleanup so that ET ⊂ TC ⊂ WT; optional mass effect (the anatomy is pushed away
  from the tumour); about 15 % low-grade-like cases without enhancement (TC = NET only).
* **Image formation** -- the signal table of DATA_SPEC B1 (partial volume from the tissue
  probabilities), per-case jitter, smooth texture, confounders (enhancing vessels, choroid-plexus-
  like spots), PSF blur, a smooth bias field per modality, Rician noise, background exactly 0,
  int16 intensities on a 0..~1000 scale.

The contrasts are chosen so that the single-modality ranking of real data holds (DATA_SPEC B2):
T1ce is the best single modality for ET and TC, FLAIR for WT, T1 is the weakest -- which is what
makes LCKD's teacher election meaningful.

Public API::

    case = make_case(seed=3)                 # dict: image (4,X,Y,Z) int16, label (X,Y,Z) uint8, ...
    write_case(case, "out", "PhantomBraTS_000")
    paths = generate("out", n=20, seed=0)    # PhantomBraTS_000 ... _019 + a small manifest
    root = ensure_phantoms(20, seed=0)       # same, into a cache folder, generated once

These are synthetic images. They are not patients and are not for clinical use.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from . import MODALITIES

__all__ = [
    "GENERATOR_VERSION",
    "PRIOR_FILE",
    "SIGNAL",
    "DIFFICULTIES",
    "LABEL_STYLES",
    "TissuePrior",
    "data_samples_dir",
    "load_prior",
    "make_case",
    "write_case",
    "generate",
    "case_seed",
    "is_lgg_like",
    "smooth_noise",
    "brain_depth",
    "case_file_names",
    "default_cache_dir",
    "ensure_phantoms",
]

#: Bump when the generator changes its output; cached phantom sets are regenerated then.
GENERATOR_VERSION = 2

PRIOR_FILE = "icbm152_2009a_tissue_prior_96.nii.gz"
#: Field of view of every phantom grid (the bundled prior: 96 voxels of 2 mm).
FOV_MM = 192.0
BASE_GRID = 96
#: Correlation length (Gaussian sigma, mm) of the within-tissue texture.
TEXTURE_SIGMA_MM = 3.0

#: Relative signal (0-1) per tissue, columns in MODALITIES order (flair, t1, t1ce, t2).
#: Rows 0-6 are DATA_SPEC B1's generator table; the last two are the confounders.
SIGNAL: dict[str, tuple[float, float, float, float]] = {
    #              flair  t1    t1ce  t2
    "wm":         (0.55, 0.90, 0.62, 0.30),
    "gm":         (0.65, 0.65, 0.48, 0.42),
    "csf":        (0.05, 0.25, 0.20, 0.95),
    "ed":         (0.95, 0.60, 0.45, 0.72),
    "ncr":        (0.40, 0.38, 0.25, 0.88),
    "et":         (0.80, 0.65, 0.98, 0.55),
    "net":        (0.82, 0.58, 0.46, 0.62),
    # enhancing vessel: bright after contrast, flow void (dark) on T2/FLAIR
    "vessel":     (0.20, 0.55, 0.95, 0.15),
    # choroid-plexus-like spot inside a ventricle: enhancing, intermediate elsewhere
    "plexus":     (0.55, 0.55, 0.92, 0.60),
}

#: Difficulty knobs: Rician noise (x mean brain signal), tumour contrast (blend weight of the tumour
#: signal over the healthy one), within-tissue texture SD, bias-field amplitude (log-SD of a 40 mm
#: smooth field), and how many confounders of each kind (min, max).
#: DATA_SPEC B1/B3 suggest texture 8 % and bias 0.15. Looked at, both make blotches that read as
#: oedema-like FLAIR patches on grey matter (texture at 2 SD: +16 %; bias at 2 SD: +35 % over a
#: lobe), so "standard" uses texture 5 % and bias 0.10, and "hard" the full spec values and more.
#: (ET keeps its own 10 % heterogeneity at every level.)
DIFFICULTIES: dict[str, dict] = {
    "easy": dict(noise=0.03, contrast=1.0, texture=0.03, bias=0.05, vessels=(0, 0), plexus=(0, 0)),
    "standard": dict(noise=0.04, contrast=1.0, texture=0.05, bias=0.10, vessels=(3, 6), plexus=(1, 2)),
    "hard": dict(noise=0.055, contrast=0.75, texture=0.08, bias=0.15, vessels=(6, 10), plexus=(2, 3)),
}

#: label value of (NCR/NET, ED, ET) and the file suffixes per convention.
LABEL_STYLES: dict[str, dict] = {
    "brats2018": dict(labels=(1, 2, 4), sep="_", suffix=dict(flair="flair", t1="t1", t1ce="t1ce", t2="t2", seg="seg")),
    "brats2023": dict(labels=(1, 2, 3), sep="-", suffix=dict(flair="t2f", t1="t1n", t1ce="t1c", t2="t2w", seg="seg")),
}

# internal tissue codes of the tumour map (0 = healthy / background)
_ED, _NCR, _ET, _NET = 1, 2, 3, 4

_REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# the anatomical prior
# --------------------------------------------------------------------------------------------
class TissuePrior(NamedTuple):
    """Tissue probabilities on a phantom grid.

    ``probs``: (3, X, Y, Z) float32 in [0, 1], channels (gm, wm, csf), read-only;
    ``affine``: (4, 4) RAS voxel -> mm.
    """

    probs: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm, shape (3,)."""
        return np.abs(np.diag(self.affine)[:3]).copy()

    @property
    def brain(self) -> np.ndarray:
        """Brain mask (X, Y, Z) bool: where the three probabilities sum to more than 0.5."""
        return self.probs.sum(0) > 0.5


def data_samples_dir() -> Path:
    """Folder holding the bundled prior and demo cases.

    ``$LCKD_KIT_DATA_SAMPLES`` if set, else ``<repo>/data_samples`` next to the package.
    """
    env = os.environ.get("LCKD_KIT_DATA_SAMPLES")
    return Path(env) if env else _REPO_ROOT / "data_samples"


def _normalise_shape(shape: int | Sequence[int] | None) -> tuple[int, int, int]:
    if shape is None:
        return (BASE_GRID,) * 3
    if isinstance(shape, (int, np.integer)):
        return (int(shape),) * 3
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"grid shape must be an int or 3 ints >= 8, got {shape}")
    return shape


def _grid_affine(base_affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Affine of a ``shape`` grid covering exactly the field of view of the 96^3 base grid."""
    base_sp = np.diag(base_affine)[:3]
    lower_edge = base_affine[:3, 3] - base_sp / 2.0  # outer face of voxel 0
    sp = base_sp * BASE_GRID / np.asarray(shape)
    out = np.diag(np.append(sp, 1.0))
    out[:3, 3] = lower_edge + sp / 2.0
    return out


def _resample(vol: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample one volume onto another axis-aligned grid: Gaussian anti-aliasing, then trilinear."""
    src_sp = np.abs(np.diag(src_affine)[:3])
    dst_sp = np.abs(np.diag(dst_affine)[:3])
    sigma = np.sqrt(np.maximum(dst_sp**2 - src_sp**2, 0.0)) / 2.3548 / src_sp
    smooth = ndimage.gaussian_filter(vol.astype(np.float32), sigma) if sigma.max() > 0 else vol
    vox2vox = np.linalg.inv(src_affine) @ dst_affine
    # axis-aligned grids: each output axis samples one input axis, so 1-D coordinates suffice
    axes = [vox2vox[k, k] * np.arange(shape[k]) + vox2vox[k, 3] for k in range(3)]
    coords = np.meshgrid(*axes, indexing="ij")
    return ndimage.map_coordinates(smooth, coords, order=1, mode="nearest").astype(np.float32)


@functools.lru_cache(maxsize=8)
def _load_prior_cached(shape: tuple[int, int, int], folder: str) -> TissuePrior:
    path = Path(folder) / PRIOR_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"tissue prior {path} not found. It ships in the repository's data_samples/ folder; "
            "run from a checkout of lckd_kit, set LCKD_KIT_DATA_SAMPLES to a folder holding "
            f"{PRIOR_FILE}, or rebuild it with `python tools/make_prior.py`."
        )
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)  # (96, 96, 96, 3) uint8
    probs = np.moveaxis(data, -1, 0).astype(np.float32) / 255.0
    affine = img.affine.copy()
    if shape != probs.shape[1:]:
        new_affine = _grid_affine(affine, shape)
        probs = np.stack([_resample(p, affine, new_affine, shape) for p in probs])
        affine = new_affine
    probs = np.ascontiguousarray(np.clip(probs, 0.0, 1.0))
    probs.setflags(write=False)  # cached and shared: nobody may modify it in place
    affine.setflags(write=False)
    return TissuePrior(probs, affine)


@functools.lru_cache(maxsize=8)
def _brain_depth_cached(shape: tuple[int, int, int], folder: str) -> np.ndarray:
    prior = _load_prior_cached(shape, folder)
    depth = ndimage.distance_transform_edt(prior.brain, sampling=prior.spacing).astype(np.float32)
    depth.setflags(write=False)
    return depth


def brain_depth(shape: int | Sequence[int] | None = None) -> np.ndarray:
    """Distance (mm) of every brain voxel to the outside of the brain mask: (X, Y, Z) float32, cached."""
    return _brain_depth_cached(_normalise_shape(shape), str(data_samples_dir()))


def load_prior(shape: int | Sequence[int] | None = None) -> TissuePrior:
    """The bundled GM/WM/CSF prior, on the 96^3 @ 2 mm grid or resampled to ``shape``.

    ``shape``: None (96^3), an int n (n^3) or three ints; the 192 mm field of view is kept, so
    the voxel size becomes 192/n mm (32 -> 6 mm). Returns a :class:`TissuePrior` with probs
    (3, X, Y, Z) float32 (gm, wm, csf; read-only, cached) and a RAS affine.
    Raises FileNotFoundError if the prior file cannot be found.
    """
    return _load_prior_cached(_normalise_shape(shape), str(data_samples_dir()))


# --------------------------------------------------------------------------------------------
# random fields
# --------------------------------------------------------------------------------------------
def _upsample_matrix(n_fine: int, n_coarse: int, factor: int, margin: int) -> np.ndarray:
    """(n_fine, n_coarse) linear-interpolation weights: fine voxel i sits at coarse (i+.5)/f-.5+margin."""
    pos = (np.arange(n_fine) + 0.5) / factor - 0.5 + margin
    lo = np.floor(pos).astype(int)
    frac = (pos - lo).astype(np.float32)
    mat = np.zeros((n_fine, n_coarse), dtype=np.float32)
    mat[np.arange(n_fine), lo] = 1.0 - frac
    mat[np.arange(n_fine), lo + 1] = frac
    return mat


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma_vox: float) -> np.ndarray:
    """Gaussian-smoothed white noise, rescaled to zero mean and unit variance: (X, Y, Z) float32.

    Wide kernels are made on a coarse grid and linearly upsampled (separable, three small matrix
    products) -- a 40 mm bias field costs milliseconds instead of half a second.
    """
    factor = max(1, int(sigma_vox // 2))  # keeps >= 2 coarse voxels per sigma: upsampling stays smooth
    margin = 1
    cshape = tuple(-(-s // factor) + 2 * margin for s in shape)
    field = rng.standard_normal(cshape, dtype=np.float32)
    field = ndimage.gaussian_filter(field, sigma_vox / factor, mode="wrap")
    if factor > 1:
        m0, m1, m2 = (_upsample_matrix(nf, nc, factor, margin) for nf, nc in zip(shape, cshape))
        field = (m0 @ field.reshape(cshape[0], -1)).reshape(shape[0], cshape[1], cshape[2])
        field = np.matmul(m1, field)  # (Y, cy) @ (X, cy, cz) -> (X, Y, cz)
        field = field @ m2.T  # -> (X, Y, Z)
    else:
        field = field[margin:margin + shape[0], margin:margin + shape[1], margin:margin + shape[2]]
    field = np.ascontiguousarray(field, dtype=np.float32)
    sub = field[::2, ::2, ::2]  # a smooth field's moments are well estimated from every 8th voxel
    field -= sub.mean()
    field /= max(float(sub.std()), 1e-6)
    return field


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


def _pick_centre(rng: np.random.Generator, prior: TissuePrior) -> np.ndarray:
    """Tumour centre (mm, (3,)): a random voxel in deep white matter, supratentorial.

    DATA_SPEC B3: WM probability > 0.6 and >= 14 mm inside the brain; additionally z > -5 mm (MNI)
    because adult gliomas are mostly supratentorial (this keeps them out of the cerebellum).
    """
    gm, wm, csf = prior.probs
    depth = brain_depth(wm.shape)
    z_mm = _world_axes(prior.affine, wm.shape)[2]
    ok = (wm > 0.6) & (depth >= 14.0) & (z_mm[None, None, :] > -5.0)
    if not ok.any():  # very coarse grids: relax to the deepest white matter available
        ok = (wm > 0.5) & (depth >= 0.5 * depth.max())
    candidates = np.argwhere(ok)
    vox = candidates[rng.integers(len(candidates))]
    return nib.affines.apply_affine(prior.affine, vox).astype(np.float32)


def _mass_effect(probs: np.ndarray, affine: np.ndarray, brain: np.ndarray, centre: np.ndarray,
                 r_tc: float, r_wt: float) -> np.ndarray:
    """Push the anatomy away from the tumour: probs'(x) = probs(x - u(x)) -> (3, X, Y, Z) float32.

    u(x) = 0.3 R_tc exp(-|x-c|^2 / 2 R_wt^2) (x-c)/|x-c|  (DATA_SPEC B3.7), so ventricles and
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
    """Paint the tumour (DATA_SPEC B3.2-6 and B3.8).

    Returns ``tissue`` (X, Y, Z) uint8 with codes 0 healthy, _ED, _NCR, _ET, _NET (ET ⊂ TC ⊂ WT
    guaranteed by construction and cleanup) and ``ed_weight`` (X, Y, Z) float32: the oedema blend
    weight, fading from 1 deep inside to 0.35 at the WT border over geom["fade_mm"].
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
    ed_weight = 0.35 + 0.65 * np.clip((depth - 0.5 * mean_sp) / geom["fade_mm"], 0.0, 1.0)
    return tissue, ed_weight.astype(np.float32)


def _lgg_decision(rng: np.random.Generator, no_et_fraction: float) -> bool:
    """The low-grade-like decision (DATA_SPEC B3.8): True with probability ``no_et_fraction``."""
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
    """Random tumour parameters (mm) of DATA_SPEC B3.3 and the LGG-like decision (B3.8).

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


def _check_style(label_style: str) -> None:
    if label_style not in LABEL_STYLES:
        raise ValueError(f"label_style must be one of {sorted(LABEL_STYLES)}, got {label_style!r}")


def make_case(seed: int, grid: int | Sequence[int] = 96, difficulty: str = "standard",
              no_et_fraction: float = 0.15, mass_effect: bool = True, label_style: str = "brats2018") -> dict:
    """Generate one synthetic case, deterministically from ``seed``.

    Parameters
    ----------
    seed : the only source of randomness (``np.random.default_rng(seed)``); same seed, same case.
    grid : 96 -> 96^3 at 2 mm; n -> n^3 at 192/n mm (32 -> 6 mm, for fast tests).
    difficulty : "easy", "standard" or "hard" (see :data:`DIFFICULTIES`).
    no_et_fraction : probability that the case is low-grade-like (no enhancing tumour).
    mass_effect : push the anatomy away from the tumour.
    label_style : "brats2018" (labels 0,1,2,4) or "brats2023" (0,1,2,3).

    Returns a dict:
      ``image`` (4, X, Y, Z) int16, MODALITIES order, 0 outside the brain, ~0..1000 inside;
      ``label`` (X, Y, Z) uint8 in ``label_style``; ``affine`` (4, 4) RAS; ``spacing`` (3,) mm;
      ``brain`` (X, Y, Z) bool; ``has_et`` bool; ``lgg_like`` bool;
      ``volumes`` {"ET", "TC", "WT"} in cm^3; ``label_style``; ``params`` (the drawn parameters).
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    _check_style(label_style)
    knobs = DIFFICULTIES[difficulty]
    rng = np.random.default_rng(seed)
    prior = load_prior(grid)
    affine = np.array(prior.affine)
    sp = prior.spacing
    shape = prior.probs.shape[1:]

    geom = _draw_geometry(rng, no_et_fraction)
    centre = _pick_centre(rng, prior)
    brain = prior.brain  # the skull-stripping mask is not moved by the tumour
    if mass_effect:
        probs = _mass_effect(prior.probs, affine, brain, centre, geom["R_tc"], geom["R_wt"])
    else:
        probs = prior.probs * brain
    tissue, ed_weight = _tumour_map(rng, probs, brain, affine, centre, geom)

    n_vessels = int(rng.integers(knobs["vessels"][0], knobs["vessels"][1] + 1))
    n_plexus = int(rng.integers(knobs["plexus"][0], knobs["plexus"][1] + 1))
    keep_out = ndimage.binary_dilation(tissue > 0, iterations=max(1, int(round(4.0 / sp.mean()))))
    vessel_w, plexus_w = _confounders(rng, probs, brain, brain_depth(shape), affine, keep_out, n_vessels, n_plexus)

    # Image formation works on the brain voxels only (1-D arrays, ~27 % of the grid); the
    # background is exactly 0 anyway. Healthy partial-volume weights are renormalised so that the
    # brain edge is not darkened artificially (BraTS is skull-stripped with a sharp edge).
    inside = np.nonzero(brain)
    pv = probs[(slice(None),) + inside]
    pv = pv / np.maximum(pv.sum(0, keepdims=True), 1e-3)
    tis = tissue[inside]
    tumour_w = np.where(tis == _ED, ed_weight[inside], (tis > 0).astype(np.float32)) * knobs["contrast"]
    texture_sd = np.where(tis == _ET, max(knobs["texture"], 0.10), knobs["texture"]).astype(np.float32)
    vessel_w, plexus_w = vessel_w[inside], plexus_w[inside]
    mean_sp = float(sp.mean())

    image = np.zeros((len(MODALITIES),) + tuple(shape), np.int16)
    full = np.zeros(shape, np.float32)
    for m in range(len(MODALITIES)):
        jitter = rng.uniform(0.9, 1.1, size=len(SIGNAL))  # per case, modality and tissue
        sig = {name: row[m] * j for (name, row), j in zip(SIGNAL.items(), jitter)}
        healthy = pv[0] * sig["gm"] + pv[1] * sig["wm"] + pv[2] * sig["csf"]
        lut = np.zeros(5, np.float32)  # tumour signal indexed by tissue code (0 unused: weight 0)
        lut[_ED], lut[_NCR], lut[_ET], lut[_NET] = sig["ed"], sig["ncr"], sig["et"], sig["net"]
        signal = healthy + tumour_w * (lut[tis] - healthy)
        signal += vessel_w * (sig["vessel"] - signal)
        signal += plexus_w * (sig["plexus"] - signal)
        signal *= 1.0 + texture_sd * smooth_noise(rng, shape, TEXTURE_SIGMA_MM / mean_sp)[inside]

        full[inside] = signal
        signal = ndimage.gaussian_filter(full, 0.6)[inside]  # PSF (the dark outside blurs in: partial volume)
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
            seed=int(seed), grid=list(shape), difficulty=difficulty, no_et_fraction=float(no_et_fraction),
            mass_effect=bool(mass_effect), centre_mm=[round(float(c), 1) for c in centre],
            R_tc=round(geom["R_tc"], 2), R_ncr=round(geom["R_ncr"], 2), R_wt=round(geom["R_wt"], 2),
            n_vessels=n_vessels, n_plexus=n_plexus, generator_version=GENERATOR_VERSION,
        ),
    )


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _nifti_gz_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """NIfTI-1 .nii.gz bytes, reproducible: fixed header fields, gzip mtime 0, no file name."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"lckd_kit phantom (synthetic)"
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def case_file_names(name: str, label_style: str = "brats2018") -> dict[str, str]:
    """File name per modality + "seg" in the layout of ``label_style``.

    brats2018: ``<name>_flair.nii.gz``...; brats2023: ``<name>-t2f.nii.gz``, -t1n, -t1c, -t2w, -seg.
    """
    _check_style(label_style)
    style = LABEL_STYLES[label_style]
    return {k: f"{name}{style['sep']}{v}.nii.gz" for k, v in style["suffix"].items()}


def _convert_labels(label: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == dst:
        return label
    out = label.copy()
    out[label == LABEL_STYLES[src]["labels"][2]] = LABEL_STYLES[dst]["labels"][2]
    return out


def write_case(case: dict, out_dir: str | os.PathLike, name: str, label_style: str | None = None) -> Path:
    """Write ``case`` as ``<out_dir>/<name>/`` in the BraTS layout, atomically; return the case folder.

    ``label_style`` None keeps the case's own convention; "brats2018" writes
    ``<name>_{flair,t1,t1ce,t2,seg}.nii.gz`` with labels {0,1,2,4}; "brats2023" writes
    ``<name>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` with labels {0,1,2,3} (labels converted if needed).
    The files are assembled in a temporary folder that replaces ``<out_dir>/<name>`` in one rename,
    so an interrupted run never leaves a half-written case. Same case -> byte-identical files.
    """
    src_style = case.get("label_style", "brats2018")
    label_style = label_style or src_style
    names = case_file_names(name, label_style)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a case folder should be an ordinary folder
        affine = np.asarray(case["affine"], dtype=np.float64)
        for m, mod in enumerate(MODALITIES):
            (tmp / names[mod]).write_bytes(_nifti_gz_bytes(np.ascontiguousarray(case["image"][m], np.int16), affine))
        label = _convert_labels(np.asarray(case["label"], np.uint8), src_style, label_style)
        (tmp / names["seg"]).write_bytes(_nifti_gz_bytes(label, affine))
        old = None
        if final.exists():
            old = out_dir / f".{name}.old.{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in a set made with ``seed``: independent streams via SeedSequence."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


MANIFEST = "phantom_manifest.json"


def _case_complete(folder: Path, name: str, label_style: str) -> bool:
    return all((folder / name / f).is_file() for f in case_file_names(name, label_style).values())


def generate(out_dir: str | os.PathLike, n: int, seed: int = 0, grid: int = 96, difficulty: str = "standard",
             no_et_fraction: float = 0.15, mass_effect: bool = True, label_style: str = "brats2018",
             prefix: str = "PhantomBraTS", progress: bool = True) -> list[Path]:
    """Write ``n`` cases ``<prefix>_000`` ... into ``out_dir``; return their folders.

    Case ``i`` uses seed :func:`case_seed` (seed, i). A small manifest (``phantom_manifest.json``)
    records the parameters: cases already present with identical parameters are skipped, any
    parameter change (or a new GENERATOR_VERSION) regenerates them, and cases listed in an old
    manifest beyond ``n`` are removed so the folder holds exactly the set asked for.
    """
    from tqdm.auto import tqdm

    _check_style(label_style)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(generator_version=GENERATOR_VERSION, seed=int(seed), grid=_normalise_shape(grid),
                  difficulty=difficulty, no_et_fraction=float(no_et_fraction), mass_effect=bool(mass_effect),
                  label_style=label_style, prefix=prefix)
    params["grid"] = list(params["grid"])
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
        if same and name in old.get("cases", {}) and _case_complete(out_dir, name, label_style):
            done[name] = old["cases"][name]
        else:
            case = make_case(s, grid=grid, difficulty=difficulty, no_et_fraction=no_et_fraction,
                             mass_effect=mass_effect, label_style=label_style)
            write_case(case, out_dir, name, label_style)
            done[name] = dict(seed=s, has_et=case["has_et"],
                              volumes_cm3={k: round(v, 2) for k, v in case["volumes"].items()})
        paths.append(out_dir / name)
        # rewrite after every case so an interrupted run keeps what it finished
        manifest_path.write_text(json.dumps(dict(params=params, cases=done), indent=1) + "\n")
    return paths


def default_cache_dir() -> Path:
    """``$LCKD_KIT_CACHE``, else ``<repo>/.cache/lckd_kit`` in a checkout, else ``~/.cache/lckd_kit``."""
    env = os.environ.get("LCKD_KIT_CACHE")
    if env:
        return Path(env)
    if (_REPO_ROOT / "pyproject.toml").is_file():
        return _REPO_ROOT / ".cache" / "lckd_kit"
    return Path.home() / ".cache" / "lckd_kit"


def ensure_phantoms(n: int, seed: int = 0, grid: int = 96, cache_dir: str | os.PathLike | None = None,
                    difficulty: str = "standard", progress: bool = True) -> Path:
    """Folder with ``n`` phantom cases of these parameters, generated on first use (~1 s/case).

    The folder name encodes the parameters (``phantoms_v1_g96_standard_s0_n20``), so different
    requests never mix; :func:`generate`'s manifest makes repeated calls nearly free.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    g = "x".join(str(s) for s in _normalise_shape(grid)) if not isinstance(grid, int) else str(grid)
    folder = root / f"phantoms_v{GENERATOR_VERSION}_g{g}_{difficulty}_s{seed}_n{n}"
    generate(folder, n, seed=seed, grid=grid, difficulty=difficulty, progress=progress)
    return folder
