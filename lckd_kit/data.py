"""Reading BraTS / MSD brain-tumour data, label conventions and MONAI pipelines.

Everything this module returns uses the kit's one layout: images ``(4, X, Y, Z)`` float32 in RAS
orientation with channels in ``MODALITIES = (flair, t1, t1ce, t2)`` order, region masks
``(3, X, Y, Z)`` uint8 in ``REGIONS = (ET, TC, WT)`` order.

Cases are found on disk by :func:`find_cases` (BraTS 2018-2021, BraTS 2023/2024 and MSD file
layouts; the table of names is in :mod:`lckd_kit.discovery`, re-exported here with :class:`Case`).

Every case, whatever form it comes in (a :class:`Case`, a folder or file path, a ``load_case``
dict, a phantom dict), becomes the kit's case dict through one function, :func:`as_case`. Label
conventions (which voxel values make ET, TC, WT) are in :mod:`lckd_kit.labels`; the layout gives
the default, ``convention=`` overrides it (e.g. BraTS 2024 post-treatment data: ``"brats2024gli"``).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Hashable, Mapping

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from lckd_kit import MODALITIES
from lckd_kit.discovery import NIFTI_NAME, Case, find_cases
from lckd_kit.labels import check_label_values, get_convention, labels_to_regions, regions_to_labels

__all__ = ["Case", "find_cases", "load_case", "save_prediction", "as_case", "load_cases", "case_spacing", "LoadCased"]

# --------------------------------------------------------------------------------------------
# loading and saving


def _size(n: int) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} bytes"


#: deflate cannot compress by more than about 1032:1, so a .gz file of n bytes never holds more
_MAX_GZIP_RATIO = 1100


def _stored_bytes(path: Path, need: int) -> int:
    """How many bytes the file holds once decompressed, as far as needed to know whether it holds
    ``need`` (a .gz: the trailer's ISIZE, else a streamed count that stops at ``need``)."""
    size = path.stat().st_size
    if not path.name.lower().endswith(".gz"):
        return size
    if size < 18:  # smaller than an empty gzip member
        return 0
    if need > _MAX_GZIP_RATIO * size + 1_000_000:
        return _MAX_GZIP_RATIO * size  # no gzip stream this short can hold that much
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")  # uncompressed size mod 2^32 (of the last member)
    if need < 2**32 and isize >= need:
        return isize
    # several gzip members, > 4 GB, or really too short: count, without keeping the data
    count = 0
    try:
        with gzip.open(path, "rb") as g:
            while count < need:
                chunk = g.read(1 << 22)
                if not chunk:
                    break
                count += len(chunk)
    except (OSError, EOFError, ValueError):  # truncated or corrupt: what could be read is what it holds
        pass
    return count


def _check_stored_size(path: Path, img) -> None:
    """Refuse a header that describes more voxel data than the file holds, before anything is
    allocated (a damaged header can claim terabytes)."""
    shape = tuple(int(s) for s in img.shape)
    dtype = np.dtype(img.header.get_data_dtype())
    offset = int(img.header.get_data_offset()) if hasattr(img.header, "get_data_offset") else 0
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize + offset
    have = _stored_bytes(path, need)
    if have < need:
        raise ValueError(f"{path} cannot be read: its header describes {'x'.join(map(str, shape))} {dtype.name} voxels "
                         f"({_size(need)} with the header) but the file holds {_size(have)}; it is truncated or its "
                         f"header is damaged: export or download it again")


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file -> (data as stored, scaled by the header's slope/intercept; affine
    float64); any failure names the file. The header's size is checked against the file first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel, gzip, zlib and numpy all raise their own types
        raise ValueError(f"{path} cannot be read: {type(e).__name__}: {e}") from e
    _check_stored_size(path, img)
    try:
        data = np.asanyarray(img.dataobj)  # truncated .gz files only fail here, not in nib.load
    except Exception as e:
        raise ValueError(f"{path} cannot be read: {type(e).__name__}: {e}") from e
    return data, np.asarray(img.affine, dtype=np.float64)


def _scaling_note(path: Path) -> str:
    """ " (the header scales stored values by slope 0.5, intercept 0)" when it does, else ""."""
    try:  # nibabel moves the header's scaling onto the data proxy when it loads a file
        proxy = nib.load(str(path)).dataobj
        slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    except Exception:
        return ""
    slope = 1.0 if slope is None or not np.isfinite(slope) else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if (slope, inter) == (1.0, 0.0):
        return ""
    return f" (the header scales the stored values by slope {slope:g}, intercept {inter:g})"


def _check_label_file(data: np.ndarray, path: Path, conv) -> np.ndarray:
    """Label values as the file means them (after its scaling): whole numbers of ``conv``."""
    if np.issubdtype(data.dtype, np.floating):
        _check_finite(data, path)
        rounded = np.rint(data)
        off = np.abs(data - rounded) > 1e-3
        if off.any():
            examples = ", ".join(f"{v:g}" for v in np.unique(data[off])[:5])
            raise ValueError(f"{path}: label values must be whole numbers, but {int(off.sum())} voxels are not (e.g. "
                             f"{examples}){_scaling_note(path)}; fix the file's scaling or export the labels again")
        data = rounded
    try:
        check_label_values(data, conv, where=str(path))
    except ValueError as e:
        note = _scaling_note(path)
        raise ValueError(f"{e}{note}" if note else str(e)) from None
    return data


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


def _fmt_affine(a: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(a)[:3]) + "]"


def _check_geometry(path: Path, shape, affine, ref_path: Path, ref_shape, ref_affine) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise ValueError(f"{path}: shape {tuple(shape)} differs from {ref_path.name} {tuple(ref_shape)}")
    if not np.allclose(affine, ref_affine, atol=1e-3):
        raise ValueError(f"{path}: its voxels lie elsewhere in space than {ref_path.name}'s (affine "
                         f"{_fmt_affine(affine)} vs {_fmt_affine(ref_affine)}); register or resample the files "
                         f"of a case onto one grid")


def _as_stored_like(data: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` reoriented to the axis order and directions of ``ref_affine`` (the same voxels in
    space: a file stored with a flipped or permuted axis describes the same grid)."""
    ornt = ornt_transform(io_orientation(affine), io_orientation(ref_affine))
    if (ornt == [[0, 1], [1, 1], [2, 1]]).all():
        return data, affine
    data = apply_orientation(data, ornt)
    return data, affine @ inv_ornt_aff(ornt, data.shape[:3])


def _check_scale(data: np.ndarray, path: Path) -> None:
    """Refuse intensities whose squares summed over the volume overflow float32, which would make
    the z-score's statistics inf and the normalised image NaN."""
    peak = float(np.abs(data).max()) if data.size else 0.0
    limit = float(np.sqrt(np.finfo(np.float32).max / max(data.size, 1)))
    if peak > limit:
        raise ValueError(f"{path}: intensities reach {peak:.3g}, beyond what float32 normalisation can handle "
                         f"(about {limit:.2g} for {data.size} voxels); the header's scaling (scl_slope) is probably "
                         f"wrong: fix it or export the image again")


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
        for m in MODALITIES:
            _check_scale(image[..., MODALITIES.index(m)], path)
        return image, affine, path

    ref_path, channels, ref_shape, ref_affine = None, [], None, None
    for m in MODALITIES:
        path = Path(case.image_files[m])
        data, affine = _read_nifti(path)
        data = _squeeze3d(data, path).astype(np.float32)
        _check_finite(data, path)
        _check_scale(data, path)
        if ref_path is None:
            ref_path, ref_shape, ref_affine = path, data.shape, affine
        else:  # compared in space: another storage order of the same grid is the same grid
            data, affine = _as_stored_like(data, affine, ref_affine)
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
        data = _check_label_file(data, path, conv)
        data, affine = _as_stored_like(data, affine, original_affine)
        _check_geometry(path, data.shape, affine, ref_path, original_shape, original_affine)
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
    if NIFTI_NAME.match(path.name) is None:
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
# one case, whatever form it comes in


def _case_at(path: Path, convention: str | None) -> Case:
    """The one case a folder holds, or the case one of whose files ``path`` is."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        cases = find_cases(path, convention=convention)
        if len(cases) != 1:
            raise ValueError(f"{path} holds {len(cases)} cases ({', '.join(c.name for c in cases[:5])}"
                             f"{', ...' if len(cases) > 5 else ''}); pass one case folder")
        return cases[0]
    target = path.resolve()
    for case in find_cases(path.parent, convention=convention):
        files = list(case.image_files.values()) + ([case.label_file] if case.label_file else [])
        if target in {Path(f).resolve() for f in files}:
            return case
    raise FileNotFoundError(f"{path} is not a file of any case in {path.parent}")


def case_spacing(item) -> tuple[float, float, float] | None:
    """Voxel size (mm) along X, Y, Z (RAS) of a case: from a ``Case``'s file header (nothing else
    is read) or from a case dict's ``spacing`` / ``affine``; None if it cannot be known."""
    if isinstance(item, Case):
        path = Path(item.image_files[MODALITIES[0]])
        try:
            affine = np.asarray(nib.load(str(path)).affine, np.float64)
        except Exception as e:  # nibabel and gzip raise their own types
            raise ValueError(f"{path} cannot be read: {type(e).__name__}: {e}") from e
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        out = np.zeros(3)
        for axis, (ras_axis, _) in enumerate(io_orientation(affine)):
            out[int(ras_axis)] = zooms[axis]
        return tuple(float(v) for v in out)
    return _spacing_of(item)


def _spacing_of(d: Mapping[str, Any]) -> tuple[float, float, float] | None:
    if d.get("spacing") is not None:
        return tuple(float(s) for s in np.broadcast_to(np.asarray(d["spacing"], np.float64), (3,)))
    if d.get("affine") is not None:
        return tuple(float(s) for s in np.linalg.norm(np.asarray(d["affine"], np.float64)[:3, :3], axis=0))
    return None


def as_case(item, normalize: bool = False, convention: str | None = None) -> dict[str, Any]:
    """Any form of one case -> the kit's case dict. The one place where this conversion happens.

    Args:
        item: a :class:`Case`; a path to a case folder or to one of its files; a dict from
            :func:`load_case`; a dict from ``phantom.make_case`` (integer label map, ``label_style``);
            or any dict with ``"image"`` ``(4, X, Y, Z)`` and optionally ``"label"`` (region masks
            ``(3, X, Y, Z)`` or a label map ``(X, Y, Z)`` in the dict's ``convention``/``label_style``).
        normalize: z-score the image (``transforms.normalize_image``) unless the dict says it already
            is (``"normalized": True``); raw images stay raw otherwise.
        convention: label convention for a path (default: the layout's).

    Returns:
        A new dict with ``"name"``, ``"image"`` float32 ``(4, X, Y, Z)``, ``"label"`` uint8
        ``(3, X, Y, Z)`` (ET, TC, WT) or None, ``"spacing"`` (3 floats, mm; None if unknown),
        ``"normalized"``, and every other key of the input (a loaded case keeps the geometry that
        :func:`save_prediction` needs).
    """
    if isinstance(item, (str, os.PathLike)):
        item = _case_at(Path(item), convention)
    if isinstance(item, Case):
        item = load_case(item)
    if not isinstance(item, Mapping) or "image" not in item:
        raise ValueError(f"cannot read {type(item).__name__} as a case: expected a Case, a path or a dict with 'image'")
    d = dict(item)
    image = np.asarray(d["image"].as_tensor() if hasattr(d["image"], "as_tensor") else d["image"])
    if image.ndim != 4 or image.shape[0] != len(MODALITIES):
        raise ValueError(f"case {d.get('name', '?')}: image must be ({len(MODALITIES)}, X, Y, Z), got {image.shape}")
    label = d.get("label")
    if label is not None:
        label = np.asarray(label)
        if label.ndim == 3:  # an integer label map
            label = labels_to_regions(label, d.get("convention") or d.get("label_style") or "brats2018")
        label = (label > 0).astype(np.uint8)
        if label.shape != (3,) + image.shape[1:]:
            raise ValueError(f"case {d.get('name', '?')}: label {label.shape} does not match image {image.shape}")
    if d.get("name") is None:
        seed = (d.get("params") or {}).get("seed")
        d["name"] = f"phantom seed {seed}" if seed is not None else "case"
    image = image.astype(np.float32, copy=False)
    if normalize and not d.get("normalized"):
        from lckd_kit.transforms import normalize_image

        image = normalize_image(image, d.get("normalization", "zscore"))
        d["normalized"] = True
    d.update(image=image, label=label, spacing=_spacing_of(d), normalized=bool(d.get("normalized")))
    return d


def load_cases(data, labelled: bool = False, normalize: bool = False, convention: str | None = None,
               limit: int | None = None) -> list[dict[str, Any]]:
    """Every case of a folder (or of a list of cases in any form :func:`as_case` reads), loaded.

    ``labelled=True`` keeps only labelled cases and raises ``FileNotFoundError`` if none is left.
    """
    items = find_cases(data, convention=convention) if isinstance(data, (str, os.PathLike)) else list(data)
    if labelled:
        items = [c for c in items if (c.labelled if isinstance(c, Case) else _has_label(c))]
        if not items:
            raise FileNotFoundError(f"{data if isinstance(data, (str, os.PathLike)) else 'the given cases'}: "
                                    f"no labelled case (a label file is needed to train or score)")
    return [as_case(c, normalize=normalize) for c in items[:limit]]


def _has_label(item) -> bool:
    return item.get("label") is not None if isinstance(item, Mapping) else True


class LoadCased(MapTransform):
    """Dict transform: ``{"case": Case}`` -> the dict :func:`load_case` returns (other keys kept).

    Put it first in a pipeline so ``CacheDataset`` caches the loading.
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
