"""The anatomy a phantom tumour grows in: tissue probabilities from the ICBM152 template.

The bundled prior (``data_samples/icbm152_2009a_tissue_prior_96.nii.gz``: GM/WM/CSF probabilities,
96^3 voxels of 2 mm, RAS, derived from the ICBM152 2009a template) is resampled to any phantom
grid with the same 192 mm field of view, or scaled and placed on the 240 x 240 x 155, 1 mm, LPS
grid of real BraTS volumes (:func:`brats_space`). Also here: the smooth random fields that give the
phantoms their texture and bias fields. The phantom recipe itself is :mod:`lckd_kit.phantom`.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from .paths import data_samples_dir

PRIOR_FILE = "icbm152_2009a_tissue_prior_96.nii.gz"
#: Field of view of every phantom grid (the bundled prior: 96 voxels of 2 mm).
FOV_MM = 192.0
BASE_GRID = 96


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


def normalise_shape(shape: int | Sequence[int] | None) -> tuple[int, int, int]:
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


def resample(vol: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
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
        probs = np.stack([resample(p, affine, new_affine, shape) for p in probs])
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
    return _brain_depth_cached(normalise_shape(shape), str(data_samples_dir()))


def load_prior(shape: int | Sequence[int] | None = None) -> TissuePrior:
    """The bundled GM/WM/CSF prior, on the 96^3 @ 2 mm grid or resampled to ``shape``.

    ``shape``: None (96^3), an int n (n^3) or three ints; the 192 mm field of view is kept, so
    the voxel size becomes 192/n mm (32 -> 6 mm). Returns a :class:`TissuePrior` with probs
    (3, X, Y, Z) float32 (gm, wm, csf; read-only, cached) and a RAS affine.
    Raises FileNotFoundError if the prior file cannot be found.
    """
    return _load_prior_cached(normalise_shape(shape), str(data_samples_dir()))


# --------------------------------------------------------------------------------------------
# BraTS space: 240 x 240 x 155 voxels of 1 mm, LPS (the SRI24 atlas grid BraTS is resampled to)
# --------------------------------------------------------------------------------------------
GEOMETRIES = ("mni", "brats")
#: Shape and nibabel affine of a BraTS volume (SRI24 space: ITK origin (0, -239, 0), identity
#: direction, 1 mm; in nibabel's RAS world that is x = -i, y = 239 - j, z = k: LPS axes).
BRATS_SHAPE = (240, 240, 155)
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
#: Where a BraTS brain sits: the centre of its bounding box, in voxel indices of BRATS_SHAPE
#: (from a real BraTS-preprocessed case: brain from voxel 54 to 182, 51 to 212, 9 to 139).
BRATS_BRAIN_CENTRE_VOX = (118.0, 131.5, 74.0)
#: Linear scale from the ICBM152 anatomy to a BraTS-sized brain. The ICBM152 2009 average is
#: larger than a typical adult brain (its bounding box 144 x 180 x 156 mm against 129 x 162 x 131
#: mm for a BraTS case) and would not fit the 155 slices; scaled by 0.9 it spans about
#: 130 x 162 x 140 mm. Only the anatomy is scaled: tumour sizes stay in mm.
BRATS_ANATOMY_SCALE = 0.9
#: margin (voxels) of the working box around the brain; everything outside it is background
_BRATS_MARGIN = 3


class BratsSpace(NamedTuple):
    """The prior on a 1-mm RAS working box around the brain, and how to place it in a BraTS volume.

    ``prior``: TissuePrior on the working box (RAS, 1 mm; world = the BraTS volume's world);
    ``depth``: distance to the outside of the brain (mm); ``lo``: first voxel of the box in the RAS
    flip of the BraTS grid; ``z_min_mm``: the supratentorial limit (MNI z = -5 mm) in this world.
    """

    prior: TissuePrior
    depth: np.ndarray
    lo: tuple[int, int, int]
    z_min_mm: float


def brats_space() -> BratsSpace:
    """The prior scaled to a BraTS-sized brain on a 1-mm working box, and where that box sits in a
    BraTS volume (cached)."""
    return _brats_space_cached(str(data_samples_dir()))


@functools.lru_cache(maxsize=2)
def _brats_space_cached(folder: str) -> BratsSpace:
    base = _load_prior_cached((BASE_GRID,) * 3, folder)
    s = BRATS_ANATOMY_SCALE
    idx = np.argwhere(base.brain)
    mni_centre = nib.affines.apply_affine(base.affine, (idx.min(0) + idx.max(0)) / 2.0)
    # RAS flip of the BraTS grid: voxel (i', j', k) = BraTS voxel (239 - i', 239 - j', k); its world
    # (RAS mm) is x = i' - 239, y = j', z = k, the same world as BRATS_AFFINE's.
    ras_origin = np.array([-(BRATS_SHAPE[0] - 1.0), 0.0, 0.0])
    cv = BRATS_BRAIN_CENTRE_VOX
    centre_world = np.array([-cv[0], (BRATS_SHAPE[1] - 1) - cv[1], cv[2]])
    # brain bounding box (mm) after scaling, placed on centre_world -> the working box in voxels
    half = (idx.max(0) - idx.min(0) + 1) * np.diag(base.affine)[:3] * s / 2.0
    lo = np.floor(centre_world - half - ras_origin).astype(int) - _BRATS_MARGIN
    hi = np.ceil(centre_world + half - ras_origin).astype(int) + _BRATS_MARGIN + 1
    lo, hi = np.maximum(lo, 0), np.minimum(hi, BRATS_SHAPE)
    shape = tuple(int(h - l) for l, h in zip(lo, hi))
    box_affine = np.eye(4)
    box_affine[:3, 3] = ras_origin + lo
    # box voxel -> world -> MNI mm: mni = (world - centre_world) / s + mni_centre
    to_mni = np.diag([1.0 / s, 1.0 / s, 1.0 / s, 1.0])
    to_mni[:3, 3] = mni_centre - centre_world / s
    probs = np.stack([resample(p, base.affine, to_mni @ box_affine, shape) for p in base.probs])
    probs = np.ascontiguousarray(np.clip(probs, 0.0, 1.0))
    probs.setflags(write=False)
    box_affine.setflags(write=False)
    prior = TissuePrior(probs, box_affine)
    depth = ndimage.distance_transform_edt(prior.brain).astype(np.float32)
    depth.setflags(write=False)
    z_min = float((-5.0 - mni_centre[2]) * s + centre_world[2])
    return BratsSpace(prior, depth, tuple(int(v) for v in lo), z_min)


def to_brats_volume(arr: np.ndarray, lo: tuple[int, int, int]) -> np.ndarray:
    """Working-box array (..., x, y, z) -> full BraTS-grid array in LPS voxel order (zeros around)."""
    full = np.zeros(arr.shape[:-3] + BRATS_SHAPE, arr.dtype)
    sl = tuple(slice(l, l + n) for l, n in zip(lo, arr.shape[-3:]))
    full[(Ellipsis,) + sl] = arr
    return np.ascontiguousarray(full[..., ::-1, ::-1, :])


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


__all__ = ["PRIOR_FILE", "FOV_MM", "BASE_GRID", "TissuePrior", "normalise_shape", "resample", "load_prior",
           "brain_depth", "GEOMETRIES", "BRATS_SHAPE", "BRATS_AFFINE", "BRATS_BRAIN_CENTRE_VOX",
           "BRATS_ANATOMY_SCALE", "BratsSpace", "brats_space", "to_brats_volume", "smooth_noise"]
