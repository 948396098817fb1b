"""Finding cases on disk: the :class:`Case` record and :func:`find_cases`, which recognises the
BraTS and MSD file layouts (reading a case's voxels is :mod:`lckd_kit.data`).

Layouts recognised by :func:`find_cases` (by file names, at any depth, never by folder names):

============  ==========================================================  ==================
layout        files                                                       default convention
============  ==========================================================  ==================
brats2018     ``<case>_{flair,t1,t1ce,t2,seg}.nii[.gz]`` (BraTS 2018-2021)  ``brats2018``
brats2023     ``<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`` (BraTS 2023, 2024)    ``brats2023``
msd           ``dataset.json`` + ``imagesTr|imagesTs/*.nii.gz`` (4-D)      ``msd``
              + ``labelsTr/``; channel order read from dataset.json
============  ==========================================================  ==================

The layout gives each case its default label convention (:data:`lckd_kit.labels.LAYOUTS`);
``convention=`` overrides it.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lckd_kit import MODALITIES
from lckd_kit.labels import LAYOUTS, get_convention

__all__ = ["Case", "find_cases", "NIFTI_NAME"]


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


#: a NIfTI file name (``.nii`` or ``.nii.gz``, any case); ``stem`` is the name without it
NIFTI_NAME = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$", re.IGNORECASE)
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
    m = NIFTI_NAME.match(name)
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
    skipped; symbolic links to folders are followed, each folder read once (link cycles end). A BraTS case folder holding all four modalities, no ``seg`` file and exactly one
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
    seen_dirs: set[str] = set()
    # symbolic links are followed (datasets on shared drives are usually linked in); a folder
    # reached twice (a link cycle, or two links to one folder) is read once
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        folder = Path(dirpath)
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
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
