"""Label conventions: how each dataset release encodes tumour sub-regions as voxel values.

Region masks in the kit are ``(3, *S)`` uint8 in ``REGIONS = (ET, TC, WT)`` order (nested:
ET ⊂ TC ⊂ WT). A label map becomes regions with :func:`labels_to_regions` and goes back with
:func:`regions_to_labels`.

============  ======  =======  =========  ==================================
convention    ET      TC       WT         accepted values
============  ======  =======  =========  ==================================
brats2018     {4}     {1,4}    {1,2,4}    0, 1 NCR, 2 ED, 4 ET (2018-2021)
brats2023     {3}     {1,3}    {1,2,3}    0, 1 NETC, 2 SNFH, 3 ET
brats2024gli  {3}     {1,3}    {1,2,3}    as 2023 + 4 = resection cavity (in no region)
msd           {3}     {2,3}    {1,2,3}    0, 1 edema, 2 non-enhancing, 3 enhancing
============  ======  =======  =========  ==================================

The convention is never guessed from label values: the same value 4 is ET in 2018 and a
resection cavity in 2024.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lckd_kit import REGIONS

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


#: The supported label conventions. Regions are unions of label values.
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


def check_label_values(labels: np.ndarray, conv: LabelConvention, where: str = "") -> None:
    """Raise ValueError (naming ``where``, e.g. the file) if ``labels`` holds values outside ``conv``."""
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
    check_label_values(labels, conv)
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


__all__ = ["LabelConvention", "CONVENTIONS", "LAYOUTS", "get_convention", "check_label_values",
           "labels_to_regions", "regions_to_labels"]
