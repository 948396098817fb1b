"""A phantom case as files: the BraTS file layouts the phantom writes (label values and file names
per convention), reproducible ``.nii.gz`` bytes, the atomic :func:`write_case`, and the names a
generated set uses on disk (its manifest, the ``cues`` tag of cache folders).

The generator itself is :mod:`lckd_kit.phantom`, which re-exports everything here.
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from . import MODALITIES
from .contrast import check_cues

__all__ = ["LABEL_STYLES", "MANIFEST", "case_complete", "case_file_names", "check_label_style", "cues_tag",
           "write_case"]

#: label value of (NCR/NET, ED, ET) and the file suffixes per convention.
LABEL_STYLES: dict[str, dict] = {
    "brats2018": dict(labels=(1, 2, 4), sep="_", suffix=dict(flair="flair", t1="t1", t1ce="t1ce", t2="t2", seg="seg")),
    "brats2023": dict(labels=(1, 2, 3), sep="-", suffix=dict(flair="t2f", t1="t1n", t1ce="t1c", t2="t2w", seg="seg")),
}


def check_label_style(label_style: str) -> None:
    """Raise ValueError unless ``label_style`` is a key of :data:`LABEL_STYLES`."""
    if label_style not in LABEL_STYLES:
        raise ValueError(f"label_style must be one of {sorted(LABEL_STYLES)}, got {label_style!r}")


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
    check_label_style(label_style)
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


#: the file in which ``phantom.generate`` records a set's parameters and cases
MANIFEST = "phantom_manifest.json"


def case_complete(folder: Path, name: str, label_style: str) -> bool:
    """Whether ``folder/name`` holds every file of the case in the layout of ``label_style``."""
    return all((folder / name / f).is_file() for f in case_file_names(name, label_style).values())


def cues_tag(cues: float) -> str:
    """Folder-name tag of a ``cues`` value: 1.0 -> ``"c1"``, 0.5 -> ``"c0.5"``, 2 -> ``"c2"``."""
    return f"c{check_cues(cues):g}"
