"""Reading BraTS / MSD brain-tumour data, label conventions and MONAI pipelines.

Everything this module returns uses the kit's one layout: images ``(4, X, Y, Z)`` float32 in RAS
orientation with channels in ``MODALITIES = (flair, t1, t1ce, t2)`` order, region masks
``(3, X, Y, Z)`` uint8 in ``REGIONS = (ET, TC, WT)`` order.

Layouts recognised by :func:`find_cases` (by file names, at any depth, never by folder names):

============  ==========================================================  ==================
layout        files                                                       default convention
============  ==========================================================  ==================
brats2018     ``<case>_{flair,t1,t1ce,t2,seg}.nii[.gz]`` (BraTS 2018-2021)  ``brats2018``
brats2023     ``<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (BraTS 2023, 2024)    ``brats2023``
msd           ``dataset.json`` + ``imagesTr|imagesTs/*.nii.gz`` (4-D)      ``msd``
              + ``labelsTr/``; channel order read from dataset.json
============  ==========================================================  ==================

Label conventions (voxel values -> regions); see :data:`CONVENTIONS`:

============  ======  =======  =========  ==================================
convention    ET      TC       WT         accepted values
============  ======  =======  =========  ==================================
brats2018     {4}     {1,4}    {1,2,4}    0, 1 NCR, 2 ED, 4 ET (2018-2021)
brats2023     {3}     {1,3}    {1,2,3}    0, 1 NETC, 2 SNFH, 3 ET
brats2024gli  {3}     {1,3}    {1,2,3}    as 2023 + 4 = resection cavity (in no region)
msd           {3}     {2,3}    {1,2,3}    0, 1 edema, 2 non-enhancing, 3 enhancing
============  ======  =======  =========  ==================================

The convention is never guessed from label values: the same value 4 is ET in 2018 and a
resection cavity in 2024. Pass ``convention=`` to :func:`find_cases` when the layout's default
is wrong (e.g. BraTS 2024 post-treatment data: ``"brats2024gli"``).
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CopyItemsd,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    MapTransform,
    MaskIntensityd,
    NormalizeIntensity,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    SqueezeDimd,
)
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from . import MODALITIES, REGIONS

__all__ = [
    "Case",
    "LabelConvention",
    "CONVENTIONS",
    "LAYOUTS",
    "find_cases",
    "load_case",
    "labels_to_regions",
    "regions_to_labels",
    "save_prediction",
    "normalize_image",
    "LoadCased",
    "train_transforms",
    "val_transforms",
]

# --------------------------------------------------------------------------------------------
# label conventions


@dataclass(frozen=True)
class LabelConvention:
    """How one dataset release encodes tumour sub-regions as voxel values.

    ``necrosis``/``edema``/``enhancing`` are the values written back by :func:`regions_to_labels`
    for TC-not-ET, WT-not-TC and ET voxels.
    """

    name: str
    et: frozenset[int]
    tc: frozenset[int]
    wt: frozenset[int]
    values: frozenset[int]
    necrosis: int
    edema: int
    enhancing: int
    description: str = ""

    def region_values(self) -> tuple[frozenset[int], ...]:
        """Label values of each region, in REGIONS order (ET, TC, WT)."""
        return (self.et, self.tc, self.wt)


def _convention(name, et, tc, wt, values, necrosis, edema, enhancing, description):
    return LabelConvention(name, frozenset(et), frozenset(tc), frozenset(wt), frozenset(values),
                           necrosis, edema, enhancing, description)


#: The supported label conventions (DATA_SPEC "R"). Regions are unions of label values.
CONVENTIONS: dict[str, LabelConvention] = {
    c.name: c
    for c in (
        _convention("brats2018", {4}, {1, 4}, {1, 2, 4}, {0, 1, 2, 4}, 1, 2, 4,
                    "BraTS 2018-2021: 1 NCR/NET, 2 edema, 4 enhancing"),
        _convention("brats2023", {3}, {1, 3}, {1, 2, 3}, {0, 1, 2, 3}, 1, 2, 3,
                    "BraTS 2023 GLI/MET/SSA: 1 NETC, 2 SNFH, 3 enhancing"),
        _convention("brats2024gli", {3}, {1, 3}, {1, 2, 3}, {0, 1, 2, 3, 4}, 1, 2, 3,
                    "BraTS 2024 GLI: as 2023, 4 = resection cavity (in no region)"),
        _convention("msd", {3}, {2, 3}, {1, 2, 3}, {0, 1, 2, 3}, 2, 1, 3,
                    "MSD Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour"),
    )
}

#: Layout name -> the convention used when find_cases is not told otherwise.
LAYOUTS: dict[str, str] = {"brats2018": "brats2018", "brats2023": "brats2023", "msd": "msd"}


def get_convention(convention: str | LabelConvention) -> LabelConvention:
    """Look a convention up by name (or pass a LabelConvention through)."""
    if isinstance(convention, LabelConvention):
        return convention
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; expected one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[convention]


def _value_hint(unknown: Sequence[int], conv: LabelConvention) -> str:
    # The two classic mix-ups: 2023 data read as 2018 (3 = ET), or 2024 RC read as 2023.
    if conv.name == "brats2018" and 3 in unknown:
        return " (BraTS 2023+ uses 3 for ET: pass convention='brats2023')"
    if conv.name in ("brats2023", "msd") and 4 in unknown:
        return " (4 is ET in BraTS 2018-2021 and a resection cavity in BraTS 2024: pass convention='brats2018' or 'brats2024gli')"
    return ""


def _check_label_values(labels: np.ndarray, conv: LabelConvention, where: str = "") -> None:
    unknown = sorted(int(v) for v in np.unique(labels) if int(v) not in conv.values)
    if unknown:
        src = f"{where}: " if where else ""
        raise ValueError(
            f"{src}label values {unknown} are not part of convention {conv.name!r} "
            f"(accepted {sorted(conv.values)}){_value_hint(unknown, conv)}"
        )


def labels_to_regions(labels: np.ndarray, convention: str | LabelConvention) -> np.ndarray:
    """Integer label map ``(*S)`` -> region masks ``(3, *S)`` uint8 in (ET, TC, WT) order.

    Values outside the convention raise ``ValueError`` listing them.
    """
    conv = get_convention(convention)
    labels = np.asarray(labels)
    _check_label_values(labels, conv)
    return np.stack([np.isin(labels, sorted(v)) for v in conv.region_values()]).astype(np.uint8)


def regions_to_labels(regions: np.ndarray, convention: str | LabelConvention) -> np.ndarray:
    """Region masks ``(3, *S)`` (ET, TC, WT; anything > 0.5 is inside) -> labels ``(*S)`` uint8.

    Nesting is enforced by construction: an ET voxel is labelled ET even if its TC/WT channels
    are off, a TC voxel is never edema. WT-only -> edema, TC-not-ET -> necrosis, ET -> enhancing.
    """
    conv = get_convention(convention)
    if hasattr(regions, "detach"):
        regions = regions.detach().cpu().numpy()
    regions = np.asarray(regions)
    if regions.ndim < 2 or regions.shape[0] != len(REGIONS):
        raise ValueError(f"regions must have shape (3, *S) in {REGIONS} order, got {regions.shape}")
    et, tc, wt = (regions > 0.5)
    labels = np.zeros(regions.shape[1:], dtype=np.uint8)
    labels[wt | tc | et] = conv.edema
    labels[tc | et] = conv.necrosis
    labels[et] = conv.enhancing
    return labels


# --------------------------------------------------------------------------------------------
# finding cases


@dataclass
class Case:
    """One case on disk.

    ``image_files`` maps each modality to its file; for MSD every modality points to the same
    4-D file and ``channel_index`` says which channel (last axis) holds it.
    """

    name: str
    layout: str
    convention: str
    image_files: dict[str, Path]
    label_file: Path | None = None
    channel_index: dict[str, int] | None = None

    @property
    def labelled(self) -> bool:
        return self.label_file is not None

    @property
    def folder(self) -> Path:
        return Path(self.image_files[MODALITIES[0]]).parent


_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$", re.IGNORECASE)
# Anchored at the end, so "x_t1ce" can never be read as modality t1 of case "x_t1ce"-minus-"ce".
_BRATS2018 = re.compile(r"^(?P<case>.+)_(?P<mod>flair|t1ce|t1|t2|seg)$", re.IGNORECASE)
_BRATS2023 = re.compile(r"^(?P<case>.+)-(?P<mod>t2f|t1n|t1c|t2w|seg)$", re.IGNORECASE)
_BRATS2023_NAMES = {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "seg": "seg"}
# dataset.json channel names (lower-cased, punctuation dropped) -> kit modality.
_MSD_NAMES = {
    "flair": "flair", "t2flair": "flair", "t2f": "flair",
    "t1": "t1", "t1w": "t1", "t1n": "t1", "t1native": "t1",
    "t1gd": "t1ce", "t1ce": "t1ce", "t1c": "t1ce", "t1wgd": "t1ce", "t1post": "t1ce",
    "t2": "t2", "t2w": "t2",
}


def _hidden(name: str) -> bool:
    return name.startswith(".")  # covers macOS "._x.nii.gz" resource forks


def _nifti_stem(name: str) -> str | None:
    m = _NIFTI.match(name)
    return m.group("stem") if m and not _hidden(name) else None


def _msd_channels(dataset_json: Path) -> dict[str, int]:
    try:
        meta = json.loads(dataset_json.read_text())
        names = meta["modality"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{dataset_json} cannot be read as an MSD dataset.json with a 'modality' entry: {e!r}") from e
    index: dict[str, int] = {}
    for ch, raw in names.items():
        key = re.sub(r"[^a-z0-9]", "", str(raw).lower())
        if key not in _MSD_NAMES:
            raise ValueError(f"{dataset_json}: unknown modality name {raw!r} for channel {ch}")
        mod = _MSD_NAMES[key]
        if mod in index:
            raise ValueError(f"{dataset_json}: modality {mod!r} is listed twice ({names})")
        index[mod] = int(ch)
    missing = [m for m in MODALITIES if m not in index]
    if missing:
        raise ValueError(f"{dataset_json}: modalities {missing} not listed in 'modality' ({names})")
    return index


def _msd_cases(folder: Path, convention: str) -> list[Case]:
    channels = _msd_channels(folder / "dataset.json")
    cases = []
    for sub in ("imagesTr", "imagesTs"):
        if not (folder / sub).is_dir():
            continue
        for f in sorted((folder / sub).iterdir()):
            stem = _nifti_stem(f.name)
            if stem is None or not f.is_file():
                continue
            label = None
            for ext in (".nii.gz", ".nii"):
                cand = folder / "labelsTr" / f"{stem}{ext}"
                if cand.is_file():
                    label = cand
                    break
            cases.append(Case(stem, "msd", convention, {m: f for m in MODALITIES}, label, dict(channels)))
    return cases


def _brats_group_to_case(folder: Path, name: str, layout: str, files: dict[str, Path],
                         seg_fallback: Path | None, convention: str) -> Case:
    missing = [m for m in MODALITIES if m not in files]
    if missing:
        raise FileNotFoundError(
            f"case folder {folder}: case {name!r} ({layout} naming) has no {', '.join(missing)} file(s); "
            f"found {sorted(files)}"
        )
    label = files.get("seg", seg_fallback)
    return Case(name, layout, convention, {m: files[m] for m in MODALITIES}, label)


def find_cases(root: str | os.PathLike, convention: str | None = None) -> list[Case]:
    """Find every case under ``root`` (any depth), sorted by name.

    Recognises BraTS 2018-2021 underscore naming, BraTS 2023/2024 hyphen naming and MSD Task01
    folders (see the module docstring). Hidden files and folders (``.x``, macOS ``._x``) are
    skipped. A BraTS case folder holding all four modalities, no ``seg`` file and exactly one
    other NIfTI uses that file as its label (BraTS 2020 case 355 ships ``W39_1998.09.19_Segm.nii``).

    Args:
        root: folder to search.
        convention: label convention for every case found (a key of :data:`CONVENTIONS`);
            ``None`` uses each layout's default (:data:`LAYOUTS`).

    Raises:
        FileNotFoundError: ``root`` missing or holding no case; a case lacking a modality file.
        ValueError: unknown convention, a case found twice, an unreadable dataset.json.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} is not a folder")
    if convention is not None:
        get_convention(convention)

    def conv_for(layout: str) -> str:
        return convention if convention is not None else LAYOUTS[layout]

    cases: list[Case] = []
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        if "dataset.json" in filenames and any(d in dirnames for d in ("imagesTr", "imagesTs")):
            cases.extend(_msd_cases(folder, conv_for("msd")))
            dirnames[:] = []  # its NIfTIs are MSD cases, not BraTS files
            continue
        groups: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
        unrecognised: list[Path] = []
        for fname in sorted(filenames):
            stem = _nifti_stem(fname)
            if stem is None:
                continue
            path = folder / fname
            if m := _BRATS2018.match(stem):
                layout, mod = "brats2018", m.group("mod").lower()
            elif m := _BRATS2023.match(stem):
                layout, mod = "brats2023", _BRATS2023_NAMES[m.group("mod").lower()]
            else:
                unrecognised.append(path)
                continue
            group = groups[(layout, m.group("case"))]
            if mod in group:
                raise ValueError(f"case folder {folder}: two {mod} files for case {m.group('case')!r}: "
                                 f"{group[mod].name} and {fname}")
            group[mod] = path
        for (layout, name), files in sorted(groups.items()):
            # The fallback only applies when the folder clearly belongs to this one case.
            fallback = unrecognised[0] if len(groups) == 1 and len(unrecognised) == 1 else None
            cases.append(_brats_group_to_case(folder, name, layout, files, fallback, conv_for(layout)))

    if not cases:
        raise FileNotFoundError(
            f"no BraTS or MSD cases found under {root} (looked for <case>_flair.nii[.gz], "
            f"<case>-t2f.nii.gz or an MSD folder with dataset.json + imagesTr/)"
        )
    seen: dict[str, Case] = {}
    for case in cases:
        if case.name in seen:
            raise ValueError(f"case {case.name!r} found twice: in {seen[case.name].folder} and {case.folder}")
        seen[case.name] = case
    return sorted(cases, key=lambda c: c.name)


# --------------------------------------------------------------------------------------------
# loading and saving


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file -> (data as stored, affine float64); any failure names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # truncated .gz files only fail here, not in nib.load
    except Exception as e:  # nibabel, gzip, zlib and numpy all raise their own types
        raise ValueError(f"{path} cannot be read: {type(e).__name__}: {e}") from e
    return data, np.asarray(img.affine, dtype=np.float64)


def _to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient the first three axes to the closest canonical (RAS) orientation.

    The same result as ``nib.as_closest_canonical``, without re-reading the file.
    """
    ornt = io_orientation(affine)
    data = apply_orientation(data, ornt)
    return data, affine @ inv_ornt_aff(ornt, data.shape[:3])


def _check_finite(data: np.ndarray, path: Path) -> None:
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        raise ValueError(f"{path}: contains non-finite voxels ({n_nan} NaN, {n_inf} inf)")


def _check_geometry(path: Path, shape, affine, ref_path: Path, ref_shape, ref_affine) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise ValueError(f"{path}: shape {tuple(shape)} differs from {ref_path.name} {tuple(ref_shape)}")
    if not np.allclose(affine, ref_affine, atol=1e-3):
        raise ValueError(f"{path}: affine differs from {ref_path.name}'s\n{affine}\nvs\n{ref_affine}")


def _squeeze3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:  # some converters store (X, Y, Z, 1)
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data


def _load_images(case: Case) -> tuple[np.ndarray, np.ndarray, Path]:
    """-> image (X, Y, Z, 4) float32 in MODALITIES order, original affine, reference file."""
    if case.layout == "msd":
        path = Path(case.image_files[MODALITIES[0]])
        data, affine = _read_nifti(path)
        index = case.channel_index or {m: i for i, m in enumerate(MODALITIES)}
        if data.ndim != 4 or data.shape[3] != len(index):
            raise ValueError(f"{path}: expected a 4-D image with {len(index)} channels on the last axis "
                             f"(dataset.json), got shape {data.shape}")
        image = np.stack([data[..., index[m]] for m in MODALITIES], axis=-1).astype(np.float32)
        _check_finite(image, path)
        return image, affine, path

    ref_path, channels, ref_shape, ref_affine = None, [], None, None
    for m in MODALITIES:
        path = Path(case.image_files[m])
        data, affine = _read_nifti(path)
        data = _squeeze3d(data, path).astype(np.float32)
        _check_finite(data, path)
        if ref_path is None:
            ref_path, ref_shape, ref_affine = path, data.shape, affine
        else:
            _check_geometry(path, data.shape, affine, ref_path, ref_shape, ref_affine)
        channels.append(data)
    return np.stack(channels, axis=-1), ref_affine, ref_path


def load_case(case: Case, reorient: bool = True) -> dict[str, Any]:
    """Read one case into the kit's layout.

    Returns a dict with:

    * ``"image"``: float32 ``(4, X, Y, Z)``, MODALITIES order, raw intensities (not z-scored);
    * ``"label"``: uint8 ``(3, X, Y, Z)`` region masks (ET, TC, WT), or ``None`` if unlabelled;
    * ``"affine"``: float64 ``(4, 4)`` of the returned arrays (RAS when ``reorient``);
    * ``"spacing"``: voxel size in mm along X, Y, Z;
    * ``"name"``, ``"case"`` (the Case), ``"convention"``;
    * ``"original_affine"``, ``"original_shape"``: the file's geometry, used by
      :func:`save_prediction` to write results back in the file's own orientation.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the offending file: unreadable or
    truncated file, modalities with different shapes or affines, NaN/inf voxels, label values
    outside the convention, label shape or affine different from the image's, an MSD image
    whose channel count does not match dataset.json.
    """
    conv = get_convention(case.convention)
    image, original_affine, ref_path = _load_images(case)
    original_shape = tuple(int(s) for s in image.shape[:3])

    label = None
    if case.label_file is not None:
        path = Path(case.label_file)
        data, affine = _read_nifti(path)
        data = _squeeze3d(data, path)
        if np.issubdtype(data.dtype, np.floating):
            _check_finite(data, path)
            data = np.rint(data)
        _check_geometry(path, data.shape, affine, ref_path, original_shape, original_affine)
        _check_label_values(data, conv, where=str(path))
        label = data.astype(np.uint8)

    affine = original_affine
    if reorient:
        image, affine = _to_ras(image, original_affine)
        if label is not None:
            label, _ = _to_ras(label, original_affine)
    image = np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32)
    regions = None if label is None else np.ascontiguousarray(labels_to_regions(label, conv))
    return {
        "image": image,
        "label": regions,
        "affine": affine,
        "spacing": tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)),
        "name": case.name,
        "case": case,
        "original_affine": original_affine,
        "original_shape": original_shape,
        "convention": conv.name,
    }


def save_prediction(regions: np.ndarray, loaded: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write region masks as a label NIfTI in the case's convention and original geometry.

    Args:
        regions: ``(3, X, Y, Z)`` ET/TC/WT masks (bool, 0/1 or probabilities, > 0.5 is inside)
            in the layout :func:`load_case` returned (RAS).
        loaded: the dict :func:`load_case` returned for this case.
        path: output ``.nii`` or ``.nii.gz``; written atomically (temporary file + rename).

    Returns the path written. With the regions of the case's own label file, the output equals
    that file voxel for voxel (BraTS 2024 resection cavities excepted: they are in no region).
    """
    path = Path(path)
    if _NIFTI.match(path.name) is None:
        raise ValueError(f"{path}: prediction files must end in .nii or .nii.gz")
    labels = regions_to_labels(regions, loaded["convention"])
    image_shape = tuple(np.shape(loaded["image"])[1:])
    if labels.shape != image_shape:
        raise ValueError(f"regions have spatial shape {labels.shape}, the case {loaded['name']!r} has {image_shape}")
    original_affine = np.asarray(loaded["original_affine"], dtype=np.float64)
    # From the array's current orientation (that of loaded["affine"]) back to the file's.
    current = io_orientation(np.asarray(loaded["affine"], dtype=np.float64))
    labels = apply_orientation(labels, ornt_transform(current, io_orientation(original_affine)))
    if labels.shape != tuple(loaded["original_shape"]):
        raise ValueError(f"reoriented prediction has shape {labels.shape}, expected {tuple(loaded['original_shape'])}")

    img = nib.Nifti1Image(np.ascontiguousarray(labels, dtype=np.uint8), original_affine)
    img.set_data_dtype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # same extension: nibabel picks gzip from it
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------------------------
# MONAI pipelines

_normalize = NormalizeIntensity(nonzero=True, channel_wise=True, dtype=np.float32)


def normalize_image(image):
    """Per-modality z-score over brain (non-zero) voxels; background stays exactly 0.

    ``image``: ``(4, *S)`` numpy array or torch tensor; returns the same type, float32.
    An all-zero channel (a missing modality) stays all zero.
    """
    out = _normalize(image)
    if isinstance(image, np.ndarray):
        return np.asarray(out, dtype=np.float32)
    return out.as_tensor() if hasattr(out, "as_tensor") else out


class LoadCased(MapTransform):
    """Dict transform: ``{"case": Case}`` -> the dict :func:`load_case` returns (other keys kept).

    Put it first in a pipeline so ``CacheDataset`` caches the loading and normalisation.
    """

    def __init__(self, keys: KeysCollection = ("case",), reorient: bool = True, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.reorient = reorient

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            case = d[key]
            if not isinstance(case, Case):
                raise ValueError(f"LoadCased expects a Case under key {key!r}, got {type(case).__name__}")
            d.update(load_case(case, reorient=self.reorient))
        return d


def _nonzero(x):
    # module-level (not a lambda) so pipelines pickle into DataLoader workers
    return x != 0


def _roi(roi_size: Sequence[int] | int, spatial_dims: int) -> tuple[int, int, int]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    roi = (roi_size,) * spatial_dims if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != spatial_dims or min(roi) < 1:
        raise ValueError(f"roi_size must hold {spatial_dims} positive sizes, got {roi_size}")
    return roi if spatial_dims == 3 else (roi[0], roi[1], 1)  # 2-D: one axial slice


def train_transforms(
    roi_size: Sequence[int] | int,
    spatial_dims: int = 3,
    num_samples: int = 1,
    pos_fraction: float = 0.375,
    load: bool = False,
) -> Compose:
    """Training pipeline on dicts with ``"image"`` (4, X, Y, Z) raw and ``"label"`` (3, X, Y, Z).

    Output samples (a list of ``num_samples`` dicts per input): ``"image"`` float32 tensor
    ``(4, *roi)`` and ``"label"`` uint8 tensor ``(3, *roi)``; for ``spatial_dims=2`` axial slices
    ``(4, rx, ry)`` / ``(3, rx, ry)``. The ``"case"`` object is dropped so batches collate.

    Steps: pad to the roi; per-modality z-score over the whole case's brain (stats of the case,
    not of the crop, as the reference); crop with ``pos_fraction`` of the crop centres on tumour
    (WT) voxels and the rest on tumour-free brain voxels. The reference centres a crop on a
    random ET/WT/TC voxel with probability 0.5 x 3/4 = 0.375 and otherwise crops at random,
    hence the default; unlike the reference, the other centres stay inside the brain so small
    crops and 2-D slices are not spent on air. Then a 50 % flip per axis and light intensity
    augmentation (scale/shift +-0.1 per channel, p 0.15; Gaussian noise sigma 0.1, p 0.1) applied
    inside the brain only, so background and missing modalities stay exactly 0.

    Args:
        roi_size: crop size, ``spatial_dims`` values (an int means a cube / square).
        spatial_dims: 3 for 3-D patches, 2 for axial slices.
        num_samples: crops per case.
        pos_fraction: share of crops centred on tumour.
        load: prepend :class:`LoadCased` so the pipeline takes ``{"case": Case}`` dicts.
    """
    crop = _roi(roi_size, spatial_dims)
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must lie in [0, 1], got {pos_fraction}")
    keys = ("image", "label")
    steps: list = [LoadCased()] if load else []
    steps += [
        DeleteItemsd(keys="case"),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.uint8, track_meta=False),
        SpatialPadd(keys=keys, spatial_size=crop),
        # Indices on the raw image (brain > 0) before z-scoring makes brain voxels negative.
        # MONAI treats channel 0 of a multi-channel label as background and takes the union of
        # the rest: with nested (ET, TC, WT) that union is WT, the whole tumour -- what we want.
        FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=crop, pos=pos_fraction, neg=1.0 - pos_fraction,
            num_samples=num_samples, fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices",
        ),
        *[RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)],
        CopyItemsd(keys="image", times=1, names="brain"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.15, channel_wise=True),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.15, channel_wise=True),
        RandGaussianNoised(keys="image", prob=0.1, mean=0.0, std=0.1),
        MaskIntensityd(keys="image", mask_key="brain", select_fn=_nonzero),
        DeleteItemsd(keys="brain"),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.uint8, track_meta=False),
    ]
    if spatial_dims == 2:
        steps.append(SqueezeDimd(keys=keys, dim=-1))
    return Compose(steps)


def val_transforms(spatial_dims: int = 3, load: bool = False) -> Compose:
    """Validation pipeline: z-score only, deterministic, whole volumes.

    Output ``"image"`` float32 tensor ``(4, X, Y, Z)``, ``"label"`` uint8 tensor ``(3, X, Y, Z)``
    (or ``None`` for unlabelled cases); other keys (affine, case, ...) pass through so
    predictions can be saved with :func:`save_prediction`. ``spatial_dims=2`` returns the same
    whole volumes: 2-D models are run slice by slice at inference.
    """
    _roi(1, spatial_dims)  # validates spatial_dims
    steps: list = [LoadCased()] if load else []
    steps += [
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.uint8, track_meta=False, allow_missing_keys=True),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)
