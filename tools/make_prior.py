#!/usr/bin/env python
"""Build the bundled tissue prior ``data_samples/icbm152_2009a_tissue_prior_96.nii.gz``.

The phantom generator (:mod:`lckd_kit.phantom`) paints tumours onto real anatomy: the ICBM152
2009a nonlinear symmetric templates that ship inside the nilearn wheel on PyPI (T1, GM and WM
probability maps at 1 mm, 197x233x189, RAS). This script

1. gets the nilearn 0.14.1 wheel (``pip download --no-deps`` into a temporary folder; nilearn is
   *not* a dependency of lckd_kit and is never installed -- the wheel is a zip and the three
   ``.nii.gz`` members are read straight out of it),
2. derives GM, WM and CSF priors (CSF = clip(1 - gm - wm, 0, 1) * (t1 > 0): no CSF map is shipped),
3. regrids them to 96^3 voxels at 2 mm centred on the brain (Gaussian pre-filter, then linear
   interpolation),
4. writes one uint8 4-D NIfTI (channels gm, wm, csf, probabilities x 255, RAS affine) and the
   MNI copyright NOTICE next to it.

Usage::

    python tools/make_prior.py                       # downloads the wheel into a temp dir
    python tools/make_prior.py --wheel nilearn-0.14.1-py3-none-any.whl --out data_samples

The output is byte-reproducible (gzip with mtime 0).
"""
from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

NILEARN_VERSION = "0.14.1"
MEMBER = "nilearn/datasets/data/mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
PRIOR_NAME = "icbm152_2009a_tissue_prior_96.nii.gz"
GRID = 96
SPACING_MM = 2.0
CHANNELS = ("gm", "wm", "csf")

NOTICE = """\
Tissue prior: data_samples/icbm152_2009a_tissue_prior_96.nii.gz
-----------------------------------------------------------------
This file is derived from the ICBM 2009a Nonlinear Symmetric template
(mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz) as shipped in the
nilearn 0.14.1 wheel on PyPI (nilearn/datasets/data/). lckd_kit computed a CSF
prior as clip(1 - gm - wm, 0, 1) * (t1 > 0), resampled the GM, WM and CSF
probability maps to 96x96x96 voxels at 2 mm and stored them as uint8 (x255).
Made by tools/make_prior.py. The synthetic cases in this folder
(PhantomBraTS_demo_*) are painted onto this prior and are therefore also derived
from the template. The original notice follows.

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University.
Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided
that the above copyright notice appear in all copies. The authors and
McGill University make no representations about the suitability of this
software for any purpose. It is provided "as is" without express or
implied warranty.

Reference: V.S. Fonov, A.C. Evans, R.C. McKinstry, C.R. Almli and D.L. Collins,
"Unbiased nonlinear average age-appropriate brain templates from birth to
adulthood", NeuroImage 47, Supplement 1 (2009), S102; and V. Fonov et al.,
"Unbiased average age-appropriate atlases for pediatric studies",
NeuroImage 54(1) (2011) 313-327.
"""


def fetch_wheel(dest: Path) -> Path:
    """Download the nilearn wheel (no dependencies, no install) into ``dest``; return its path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         f"nilearn=={NILEARN_VERSION}", "-d", str(dest)],
        check=True,
    )
    wheels = sorted(dest.glob(f"nilearn-{NILEARN_VERSION}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no nilearn wheel in {dest}")
    return wheels[0]


def read_member(wheel: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one template (``kind`` in t1, gm, wm) from the wheel -> (uint8 array (197,233,189), affine)."""
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read(MEMBER.format(kind=kind)))
    img = nib.Nifti1Image.from_bytes(raw)
    if nib.aff2axcodes(img.affine) != ("R", "A", "S"):
        raise ValueError(f"{kind}: expected a RAS template, got {nib.aff2axcodes(img.affine)}")
    return np.asanyarray(img.dataobj), img.affine


def tissue_probabilities(t1: np.ndarray, gm_u8: np.ndarray, wm_u8: np.ndarray) -> np.ndarray:
    """GM, WM, CSF probabilities (3, *shape) float32 in [0, 1] on the 1 mm template grid.

    No CSF map ships with nilearn, so CSF is what GM+WM leave over inside the skull-stripped
    T1 (ventricles and sulci); outside the brain all three are 0.
    """
    brain = t1 > 0
    gm = gm_u8.astype(np.float32) / 255.0 * brain
    wm = wm_u8.astype(np.float32) / 255.0 * brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    return np.stack([gm, wm, csf])


def target_affine(t1: np.ndarray, affine: np.ndarray, grid: int = GRID, spacing: float = SPACING_MM) -> np.ndarray:
    """RAS affine of a ``grid``^3 box of ``spacing`` mm voxels whose centre is the brain's bbox centre.

    The centre is rounded to whole mm so the affine has readable numbers.
    """
    idx = np.argwhere(t1 > 0)
    centre_vox = (idx.min(0) + idx.max(0)) / 2.0
    centre_mm = np.round(nib.affines.apply_affine(affine, centre_vox))
    out = np.diag([spacing, spacing, spacing, 1.0])
    # voxel (grid-1)/2 -- the middle of the box -- lands on the brain centre
    out[:3, 3] = centre_mm - spacing * (grid - 1) / 2.0
    return out


def regrid(volumes: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Resample (C, *src) volumes onto ``shape`` with ``dst_affine`` -> (C, *shape) float32.

    Gaussian pre-filter (anti-aliasing for the coarser grid: sigma so that a 1-voxel FWHM becomes
    the target FWHM) then trilinear interpolation; outside the source box is 0.
    """
    src_sp = np.abs(np.diag(src_affine)[:3])
    dst_sp = np.abs(np.diag(dst_affine)[:3])
    sigma = np.sqrt(np.maximum(dst_sp**2 - src_sp**2, 0.0)) / 2.3548 / src_sp
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    vox2vox = np.linalg.inv(src_affine) @ dst_affine
    coords = vox2vox[:3, :3] @ grid + vox2vox[:3, 3:4]
    out = np.empty((volumes.shape[0],) + tuple(shape), dtype=np.float32)
    for c, vol in enumerate(volumes):
        smooth = ndimage.gaussian_filter(vol.astype(np.float32), sigma)
        out[c] = ndimage.map_coordinates(smooth, coords, order=1, mode="constant", cval=0.0).reshape(shape)
    return out


def to_uint8_image(probs: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """(3, X, Y, Z) probabilities -> 4-D uint8 NIfTI (X, Y, Z, 3), x255, RAS, mm units."""
    data = np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)
    data = np.ascontiguousarray(np.moveaxis(data, 0, -1))
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = b"ICBM152 2009a gm,wm,csf prior x255"
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def write_gz_deterministic(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``img`` as .nii.gz with gzip mtime 0 and no file name, so the bytes are reproducible."""
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, default=None, help="an already downloaded nilearn wheel")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data_samples")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel if args.wheel is not None else fetch_wheel(Path(tmp))
        t1, affine = read_member(wheel, "t1")
        gm, aff_gm = read_member(wheel, "gm")
        wm, aff_wm = read_member(wheel, "wm")
    if not (np.allclose(affine, aff_gm) and np.allclose(affine, aff_wm)):
        raise ValueError("the three templates do not share one grid")

    probs_1mm = tissue_probabilities(t1, gm, wm)
    dst_affine = target_affine(t1, affine)
    probs = regrid(probs_1mm, affine, dst_affine, (GRID, GRID, GRID))

    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / PRIOR_NAME
    write_gz_deterministic(to_uint8_image(probs, dst_affine), out_path)
    (args.out / "NOTICE").write_text(NOTICE)

    brain = probs.sum(0) > 0.5
    print(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.2f} MB), grid {GRID}^3 @ {SPACING_MM} mm")
    print(f"affine origin {dst_affine[:3, 3].tolist()}, brain voxels {int(brain.sum())} "
          f"({brain.sum() * SPACING_MM**3 / 1000:.0f} cm^3)")
    idx = np.argwhere(brain)
    print(f"brain bbox (voxels) {idx.min(0).tolist()} .. {idx.max(0).tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
