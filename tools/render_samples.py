#!/usr/bin/env python
"""Render ``docs/phantom_samples.png``: what the phantom cases look like.

One row per case: an axial slice through the tumour (the slice with the largest tumour core) of
FLAIR, T1, T1ce and T2 in grey, plus the T1ce slice with the label overlay (WT/TC/ET, BraTS
colours) and a legend. Slices are shown in neurological convention (patient's right on the right,
anterior at the top).

Usage::

    python tools/render_samples.py                          # 2 demo cases + one low-grade-like case
    python tools/render_samples.py --cues 0 --out /tmp/v2.png   # the low-grade-like case at another cues
    python tools/render_samples.py --case DIR --case DIR    # any BraTS 2018-2021-style case folders
    python tools/render_samples.py --out docs/phantom_samples.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lckd_kit import MODALITIES  # noqa: E402
from lckd_kit import phantom  # noqa: E402

TITLES = {"flair": "FLAIR", "t1": "T1", "t1ce": "T1ce (T1-Gd)", "t2": "T2"}
# nested regions drawn WT, then TC, then ET on top: oedema shows green, the core yellow, ET red
REGION_COLOURS = {"WT": "#2ca02c", "TC": "#ffd700", "ET": "#d62728"}


def read_case_folder(folder: Path) -> dict:
    """Read ``<folder>/<name>_{flair,t1,t1ce,t2,seg}.nii.gz`` -> image (4,X,Y,Z) float32, label (X,Y,Z)."""
    name = folder.name
    names = phantom.case_file_names(name, "brats2018")
    image = np.stack([np.asanyarray(nib.load(str(folder / names[m])).dataobj).astype(np.float32) for m in MODALITIES])
    label = np.rint(np.asanyarray(nib.load(str(folder / names["seg"])).dataobj)).astype(np.uint8)
    return dict(name=name, image=image, label=label)


def case_from_generator(seed: int, name: str, cues: float = 1.0) -> dict:
    case = phantom.make_case(seed, cues=cues)
    return dict(name=name, image=case["image"].astype(np.float32), label=case["label"])


def regions(label: np.ndarray) -> dict[str, np.ndarray]:
    """brats2018 labels -> nested region masks (ET ⊂ TC ⊂ WT)."""
    return {"ET": label == 4, "TC": np.isin(label, (1, 4)), "WT": label > 0}


def tumour_slice(label: np.ndarray) -> int:
    """Axial index (z) with the largest tumour core, or the largest whole tumour if there is no core."""
    reg = regions(label)
    area = reg["TC"].sum((0, 1))
    if area.max() == 0:
        area = reg["WT"].sum((0, 1))
    return int(np.argmax(area))


def grey_limits(vol: np.ndarray) -> tuple[float, float]:
    """Display window: 0 .. 99.5th percentile of the brain (non-zero) voxels."""
    brain = vol[vol > 0]
    return 0.0, float(np.percentile(brain, 99.5)) if brain.size else 1.0


def show(ax, sl: np.ndarray, **kw) -> None:
    # arrays are RAS (x right, y anterior): transpose so x runs along columns, origin lower = anterior up
    ax.imshow(sl.T, origin="lower", interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def render(cases: list[dict], out: Path) -> None:
    ncol = len(MODALITIES) + 1
    fig, axes = plt.subplots(len(cases), ncol, figsize=(2.6 * ncol, 2.8 * len(cases) + 0.6), squeeze=False)
    for row, case in enumerate(cases):
        z = tumour_slice(case["label"])
        for m, mod in enumerate(MODALITIES):
            vol = case["image"][m]
            lo, hi = grey_limits(vol)
            show(axes[row, m], vol[:, :, z], cmap="gray", vmin=lo, vmax=hi)
            if row == 0:
                axes[row, m].set_title(TITLES[mod], fontsize=11)
        # overlay on T1ce: WT, then TC, then ET painted on top (nested regions)
        ax = axes[row, -1]
        t1ce = case["image"][MODALITIES.index("t1ce")]
        lo, hi = grey_limits(t1ce)
        show(ax, t1ce[:, :, z], cmap="gray", vmin=lo, vmax=hi)
        reg = regions(case["label"])
        code = np.zeros(case["label"].shape[:2], np.uint8)
        for k, r in enumerate(("WT", "TC", "ET"), start=1):
            code[reg[r][:, :, z]] = k
        cmap = ListedColormap([(0, 0, 0, 0)] + [REGION_COLOURS[r] for r in ("WT", "TC", "ET")])
        show(ax, np.ma.masked_equal(code, 0), cmap=cmap, vmin=0, vmax=3, alpha=0.55)
        if row == 0:
            ax.set_title("labels on T1ce", fontsize=11)
        has_et = bool(reg["ET"].any())
        axes[row, 0].set_ylabel(f"{case['name']}\nz={z}" + ("" if has_et else "\n(no ET: LGG-like)"), fontsize=9)
    handles = [Patch(color=REGION_COLOURS[r], label=lab) for r, lab in
               (("WT", "WT: whole tumour (oedema + core)"), ("TC", "TC: tumour core (NCR/NET + ET)"),
                ("ET", "ET: enhancing tumour"))]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=10, frameon=False)
    fig.suptitle("lckd_kit phantom: synthetic tumours on ICBM152 2009a anatomy (axial, neurological view: R on right)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def first_lgg_seed(start: int = 0) -> int:
    """Smallest seed >= start whose case is low-grade-like (no ET)."""
    seed = start
    while not phantom.is_lgg_like(seed):
        seed += 1
    return seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", type=Path, default=None, help="case folder (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "phantom_samples.png")
    parser.add_argument("--cues", type=float, default=1.0, help="cues of the generated low-grade-like case")
    args = parser.parse_args(argv)
    if args.case:
        cases = [read_case_folder(p) for p in args.case]
    else:
        demo = sorted(phantom.data_samples_dir().glob("PhantomBraTS_demo_*"))
        cases = [read_case_folder(p) for p in demo[:2]]
        seed = first_lgg_seed()
        label = f"make_case({seed})" if args.cues == 1.0 else f"make_case({seed}, cues={args.cues:g})"
        cases.append(case_from_generator(seed, label, args.cues))
    render(cases, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
