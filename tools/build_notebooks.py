#!/usr/bin/env python
"""Write the teaching notebooks ``notebooks/0N_*.ipynb`` from the cell texts below.

The cell texts in this file are the source of truth. Edit them here, run
``python tools/build_notebooks.py`` and commit both. The ``.ipynb`` files are written without
outputs and execution counts and with stable cell ids, so a rebuild gives byte-identical files.
``python tools/build_notebooks.py --check`` exits 1 when a notebook differs from its source (the
tests do the same check).

Cell tags used by ``tests/test_notebooks.py``:

* ``parameters``: the one parameters cell (papermill convention);
* ``figure``: the cell must produce an ``image/png`` output;
* ``widget``: the cell must display an ipywidgets view;
* ``plotly``: the cell must display a plotly figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nbsource import PARAMS_MD, SETUP_CODE, SETUP_MD, code, colab_badge, md, notebook  # noqa: E402

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


# =============================================================================================
# 01 -- data tour
# =============================================================================================

def nb01():
    name = "01_data_tour.ipynb"
    return name, notebook(name, [
        md(f"""
# 01 · A tour of BraTS-style brain-tumour MRI

{colab_badge(name)}

A brain-tumour segmentation model such as LCKD reads **four MRI scans of the same head** and outlines
three nested tumour regions. This notebook shows what those scans and regions look like, how the
BraTS datasets store them on disk, and how `lckd_kit` reads them. The data can be the bundled demo
cases, your own BraTS download, or synthetic phantoms that take about a second each to generate.

**Learning goals.** After this notebook you can:

1. say what FLAIR, T1, T1ce and T2 each show in and around a brain tumour;
2. read a BraTS label map in any of the three conventions (BraTS 2018–2021, BraTS 2023+, MSD) and
   turn it into the nested regions ET ⊂ TC ⊂ WT;
3. load the bundled cases, your own BraTS folder and freshly generated phantoms with one loader;
4. browse a volume slice by slice in any plane.

*Time:* about a minute on a laptop CPU (`FAST = True`: about 20 s). All images here are **synthetic
phantoms** painted on a real brain template. They are not patients.
"""),
        md(SETUP_MD),
        code(SETUP_CODE),
        md(PARAMS_MD),
        code("""
SEED = 0            # phantom set (notebooks 02-04 use seed 0 too)
N_PHANTOMS = 24     # cases in the phantom set shared with notebooks 02-04 (generated once, then cached)
GRID = 96           # phantom grid: 96 -> 96^3 voxels of 2 mm
BRATS_DIR = ""      # your own BraTS / MSD folder; "" = the BRATS_DIR environment variable, if set
CONVENTION = None   # label convention of BRATS_DIR if its layout cannot tell (e.g. "brats2024gli")
FAST = False        # True: toy sizes, to check that the notebook runs (the tests set it)
""", "parameters"),
        md("""
The next cell applies the parameters (`FAST` shrinks the phantom set to four 32³ cases) and imports
the kit. `%matplotlib inline` puts figures into the notebook.
"""),
        code("""
%matplotlib inline
import json
import os
import time

import numpy as np
from IPython.display import Markdown, display
from matplotlib.figure import Figure

import lckd_kit
from lckd_kit import MODALITIES, REGIONS, data, phantom, viz, widgets

if FAST:  # 4 phantoms of 32^3 (6 mm voxels): seconds instead of a minute
    N_PHANTOMS, GRID = 4, 32
BRATS_DIR = BRATS_DIR or os.environ.get("BRATS_DIR", "")
print(f"lckd_kit {lckd_kit.__version__} | phantom set: {N_PHANTOMS} cases of {GRID}^3 | "
      f"cache: {phantom.default_cache_dir()}")
"""),
        md("""
## 1. Four scans of one head

A BraTS case is four co-registered 3-D MRI volumes. They are not four colour channels of one photo.
Each MRI sequence weights a different tissue property, so each one shows a different part of the
tumour:

| modality | what it is | in a glioma |
|---|---|---|
| **FLAIR** | T2-weighted, with the signal of free water (CSF) suppressed | oedema and infiltrated tissue around the tumour are bright while the ventricles are dark, so the **whole tumour** stands out |
| **T1** | T1-weighted, before contrast | anatomy: white matter brighter than grey matter; the tumour is darkish and blends in. The least informative alone |
| **T1ce** | T1-weighted **after a gadolinium injection** | where the blood–brain barrier is broken the contrast agent leaks out and the tissue lights up: the **enhancing rim**. The necrotic centre stays dark |
| **T2** | T2-weighted | fluid is bright: oedema **and** CSF, so the tumour edge is harder to find than on FLAIR |

The kit reads every case into one layout: `image` is `(4, X, Y, Z)` float32 in the order FLAIR, T1,
T1ce, T2 (RAS orientation), and `label` holds the three region masks `(3, X, Y, Z)` in the order ET, TC, WT.
Let's load the first bundled demo case.
"""),
        code("""
demo_cases = data.find_cases(phantom.data_samples_dir())
case = data.load_case(demo_cases[0])
print(f"{len(demo_cases)} demo cases; {case['name']}: image {case['image'].shape} {case['image'].dtype}, "
      f"voxels {case['spacing']} mm, label convention '{case['convention']}', regions {case['label'].shape}")
assert case["image"].shape[0] == len(MODALITIES) and case["label"].shape[0] == len(REGIONS)
"""),
        md("""
The axial slice with the most tumour, in the radiological convention (the patient's right on the
left of the image). Look for the **bright ring on T1ce** and the **bright halo on FLAIR**. Also
note that the ventricles are dark on FLAIR but bright on T2: that is the suppressed water.
"""),
        code("""
viz.show_modalities(case["image"], case["label"], spacing=case["spacing"], title=case["name"])
""", "figure"),
        md("""
## 2. Labels: three conventions, one set of regions

Annotators paint each tumour voxel with one of three tissue classes: **necrotic / non-enhancing core**
(NCR/NET), **oedema** (ED) and **enhancing tumour** (ET). Challenges and models score three *nested
regions* built from those classes:

* **ET**, enhancing tumour = ET;
* **TC**, tumour core = ET + NCR/NET (roughly what a surgeon removes);
* **WT**, whole tumour = TC + ED (everything abnormal);

so ET ⊂ TC ⊂ WT. The catch is that the **numbers** written for the classes changed between
releases:

| convention | used by | NCR/NET | ED | ET | ET ⊂ TC ⊂ WT as label values |
|---|---|---|---|---|---|
| `brats2018` | BraTS 2018–2021 | 1 | 2 | **4** | {4} ⊂ {1, 4} ⊂ {1, 2, 4} |
| `brats2023` | BraTS 2023 / 2024 | 1 | 2 | **3** | {3} ⊂ {1, 3} ⊂ {1, 2, 3} |
| `msd` | Medical Segmentation Decathlon, Task01 | **2** (non-enhancing) | **1** (oedema) | 3 | {3} ⊂ {2, 3} ⊂ {1, 2, 3} |

BraTS 2024 glioma data adds 4 = resection cavity, which belongs to no region (convention
`brats2024gli`). The value 4 is ET in one release and a cavity in another. So the kit never guesses
a convention from the values: it takes it from the file layout, or from you (`convention=`).

Below we read the demo case's label file as it is stored and convert it into regions. Then we write
the same regions in the other two conventions and check that reading them back gives identical regions.
"""),
        code("""
import nibabel as nib

raw = np.asarray(nib.load(str(demo_cases[0].label_file)).dataobj)
values, counts = np.unique(raw, return_counts=True)
print("label values in the file (value: voxels):", dict(zip(values.tolist(), counts.tolist())))

regions = data.labels_to_regions(raw, "brats2018")        # (3, X, Y, Z): ET, TC, WT
et, tc, wt = regions.astype(bool)
assert not (et & ~tc).any() and not (tc & ~wt).any()      # ET ⊂ TC ⊂ WT
for conv in ("brats2023", "msd"):
    other = data.regions_to_labels(regions, conv)        # the same regions, other numbers
    assert (data.labels_to_regions(other, conv) == regions).all()
    print(f"as {conv:>9}: label values {sorted(np.unique(other).tolist())}")
try:                                                      # 2023 labels read as 2018: refused, not guessed
    data.labels_to_regions(data.regions_to_labels(regions, "brats2023"), "brats2018")
except ValueError as err:
    print("reading BraTS 2023 labels as 2018 fails loudly:", err)
"""),
        md("""
The nesting, drawn on the T1ce slice and zoomed on the tumour. The left panel shows the classes as
painted (each voxel coloured by its innermost region). The other three panels fill one region each. TC contains the
bright ET rim and the dark centre, and WT adds the oedema around them.
"""),
        code("""
def show_nesting(image, regions, plane="axial"):
    \"\"\"Label classes as painted, then ET, TC and WT filled one at a time (notebook-side figure).\"\"\"
    index = viz.best_slice(regions, plane)
    t1ce = image[MODALITIES.index("t1ce")]
    img, reg = viz.take_slice(t1ce, plane, index), viz.take_slice(regions, plane, index)
    rows, cols = np.nonzero(reg[2])                                   # zoom on the whole tumour
    pad = max(4, int(rows.max() - rows.min()) // 2)
    r0, r1 = max(rows.min() - pad, 0), rows.max() + pad + 1
    c0, c1 = max(cols.min() - pad, 0), cols.max() + pad + 1
    img, reg = img[r0:r1, c0:c1], reg[:, r0:r1, c0:c1]
    lo, hi = viz.intensity_window(t1ce)
    fig = Figure(figsize=(13, 4.1), layout="constrained")
    axes = fig.subplots(1, 4)
    panels = [(REGIONS, "as painted: ED, NCR/NET, ET")] + [
        ((r,), f"{r} = {viz.REGION_NAMES[r]}") for r in REGIONS]
    for ax, (shown, title) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        viz.overlay_regions(ax, reg, alpha=0.6, regions=shown)
        ax.set_title(title, fontsize=12, fontweight="bold")
        ax.set_axis_off()
    fig.legend(handles=viz.region_handles("fill"), loc="outside lower center", ncol=3, frameon=False)
    fig.suptitle(f"ET ⊂ TC ⊂ WT on T1ce ({plane} slice {index}, zoomed). Left, as painted: green = oedema, "
                 "blue = necrotic / non-enhancing core, orange = enhancing", fontsize=12)
    return fig

show_nesting(case["image"], case["label"])
""", "figure"),
        md("""
## 3. Your own BraTS data (optional)

BraTS data may not be redistributed, so the kit ships none. After downloading it yourself, set
`BRATS_DIR` (in the parameters cell, or as an environment variable before starting Jupyter).
`data.find_cases` recognises the layout from the **file names** at any depth:

* BraTS 2018–2021: `<case>_{flair,t1,t1ce,t2,seg}.nii.gz`;
* BraTS 2023/2024: `<case>-{t2f,t1n,t1c,t2w,seg}.nii.gz`;
* MSD Task01: `imagesTr/*.nii.gz` (4-D) + `labelsTr/` + `dataset.json`.

Without `BRATS_DIR` the cell demonstrates the same loader on a phantom written in the BraTS 2023
layout. Its files are named differently, and ET is label 3 there.
"""),
        code("""
if BRATS_DIR:
    own = data.find_cases(BRATS_DIR, convention=CONVENTION)
    print(f"{len(own)} cases under {BRATS_DIR}: layouts {sorted({c.layout for c in own})}, "
          f"conventions {sorted({c.convention for c in own})}, {sum(c.labelled for c in own)} labelled")
else:
    folder = phantom.default_cache_dir() / "tour_brats2023"
    written = phantom.generate(folder, n=1, seed=SEED, grid=GRID, label_style="brats2023",
                               prefix="PhantomGLI", progress=False)
    print("BRATS_DIR is not set, so here is a phantom in the BraTS 2023 layout:",
          sorted(p.name for p in written[0].iterdir()))
    own = data.find_cases(folder)
mine = data.load_case(own[0])
print(f"{mine['name']}: layout '{own[0].layout}', convention '{mine['convention']}', "
      f"image {mine['image'].shape}, voxels {tuple(round(s, 2) for s in mine['spacing'])} mm")
viz.show_modalities(mine["image"], mine["label"], spacing=mine["spacing"], title=mine["name"])
""", "figure"),
        md("""
## 4. Making more phantoms

Training needs more than two cases. `phantom.ensure_phantoms` generates a set of phantoms into a
cache folder once (about a second per case) and returns that folder at once on every later call.
Notebooks 02–04 use this same set. Every case comes from its own seed: the same seed always gives
the same case. Each phantom is built from three ingredients:

* **anatomy**: grey matter, white matter and CSF from the ICBM152 template;
* **a tumour**: an enhancing rim around a necrotic centre, oedema that follows the white matter, and
  the anatomy pushed aside;
* **scanner effects**: a per-tissue signal table, texture, bias field, Rician noise, and a few
  enhancing vessels, so that not every bright T1ce spot is tumour.
"""),
        code("""
t0 = time.time()
train_dir = phantom.ensure_phantoms(N_PHANTOMS, seed=SEED, grid=GRID)
manifest = json.loads((train_dir / phantom.MANIFEST).read_text())
print(f"{N_PHANTOMS} phantoms ready in {train_dir} ({time.time() - t0:.0f} s; a second run is instant)")

rows = ["| case | ET cm³ | TC cm³ | WT cm³ | enhancing? |", "|---|--:|--:|--:|:-:|"]
for name, info in list(manifest["cases"].items())[:8]:
    v = info["volumes_cm3"]
    rows.append(f"| {name} | {v['ET']:.1f} | {v['TC']:.1f} | {v['WT']:.1f} | "
                f"{'yes' if info['has_et'] else '**no** (low-grade-like)'} |")
display(Markdown("\\n".join(rows) + ("\\n\\n(first 8 cases)" if N_PHANTOMS > 8 else "")))
assert len(manifest["cases"]) == N_PHANTOMS
"""),
        md("""
A gallery of the first cases: T1ce through the middle of each tumour, with the regions outlined.
The tumours differ in size, shape, position and enhancement. Phantoms without an orange ET outline
are the low-grade-like ones.
"""),
        code("""
def gallery(cases, modality="t1ce", plane="axial", ncols=4):
    \"\"\"One slice per case (the one with the most tumour), regions outlined (notebook-side figure).\"\"\"
    m = MODALITIES.index(modality)
    nrows = -(-len(cases) // ncols)
    fig = Figure(figsize=(3 * ncols, 3.2 * nrows + 0.4), layout="constrained")
    for ax, c in zip(fig.subplots(nrows, ncols, squeeze=False).ravel(), cases):
        index = viz.best_slice(c["label"], plane)
        lo, hi = viz.intensity_window(c["image"][m])
        ax.imshow(viz.take_slice(c["image"][m], plane, index), cmap="gray", vmin=lo, vmax=hi)
        viz.overlay_regions(ax, viz.take_slice(c["label"], plane, index), style="contour", linewidth=1.2)
        ax.set_title(c["name"], fontsize=9)
    for ax in fig.axes:
        ax.set_axis_off()
    fig.legend(handles=viz.region_handles("contour"), loc="outside lower center", ncol=3, frameon=False)
    fig.suptitle(f"Phantoms on {viz.display_name(modality)}, regions outlined", fontsize=13)
    return fig

some = [data.load_case(c) for c in data.find_cases(train_dir)[:8]]
gallery(some)
""", "figure"),
        md("""
## 5. Browse a volume

One slice never tells the whole story. The slice viewer shows the four modalities and the regions
for any slice of any plane. Drag the slider, switch the plane, or turn the overlay off. The viewer
needs a live kernel; a saved copy of the notebook shows the last picture.
"""),
        code("""
viewer = widgets.slice_viewer(demo_cases[0])
display(viewer)
assert viewer.image.value, "the viewer did not render"
""", "widget"),
        md("""
Widgets can also be driven from code, which helps when preparing a slide. This moves the viewer
above to the coronal plane at the slice with the most tumour:
"""),
        code("""
viewer.plane.value = "coronal"
print(f"plane {viewer.plane.value}, slice {viewer.slice_slider.value} of {viewer.slice_slider.max}, "
      f"{viewer.render_count} renders so far")
assert viewer.render_count >= 2
"""),
        md("""
## Exercises

Worked solutions: [`solutions/01_solutions.md`](solutions/01_solutions.md).

1. **Which modality shows the oedema best?** For each modality, compute the mean z-scored intensity
   (`data.normalize_image`) of the oedema voxels (WT but not TC) minus that of the rest of the brain.
   Which modality has the largest contrast? Does it match the table in section 1?
2. **Conventions on disk.** Generate two phantoms in the BraTS 2023 layout (`label_style="brats2023"`)
   and the same two in the 2018 layout (same `seed`), load both with `data.find_cases` and check that
   the region masks are identical while the label files differ.
3. **Low-grade-like cases.** Find a phantom without enhancing tumour in the manifest of your phantom
   set and show it with `viz.show_modalities`. What does its T1ce look like? What Dice should an
   ET prediction get on such a case when it predicts nothing, and when it predicts a few voxels?
4. **Harder phantoms.** Generate the same seed with `difficulty="standard"` and `difficulty="hard"`
   (`phantom.make_case`) and compare them side by side. What changed? Which region would you
   expect to be hardest for a model, and why?
"""),
    ])


# =============================================================================================
# 02 -- teacher election
# =============================================================================================

SETTINGS_02_03 = """
%matplotlib inline
import hashlib
import json
import time

import numpy as np
import torch
from IPython.display import Markdown, display
from matplotlib.figure import Figure

import lckd_kit
from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, SUBSETS, election, evaluate, experiment, phantom, train, viz

DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if DEVICE == "auto" else DEVICE
if CONFIG == "auto":  # a GPU trains the 3-D model, a CPU the 2-D one on axial slices
    CONFIG = "small" if DEVICE.startswith("cuda") else "small2d"
if FAST:  # toy sizes: 4 phantoms of 32^3, the seconds-long "tiny" config
    N_PHANTOMS, GRID, CONFIG, N_TEST = 4, 32, "tiny", 2
if THREADS or FAST:  # FAST tensors are tiny: one thread avoids OpenMP overhead
    torch.set_num_threads(THREADS or 1)
overrides = {"seed": SEED}
if not FAST and not DEVICE.startswith("cuda"):  # a short CPU run; a GPU runs the config's own schedule
    overrides.update(CPU_OVERRIDES)
cfg = train.get_train_config(CONFIG, **overrides)

train_dir = phantom.ensure_phantoms(N_PHANTOMS, seed=SEED, grid=GRID, progress=False)
test_dir = experiment.heldout_phantoms(N_TEST if FAST else experiment.DEMO_N_TEST, grid=GRID, progress=False,
                                       train_dir=train_dir)


def run_dir(config, kind):
    \"\"\"Cache folder of a notebook run, named after everything that defines it (02 and 03 share runs).\"\"\"
    key = json.dumps([train.train_config_to_dict(config), train_dir.name], sort_keys=True)
    return phantom.default_cache_dir() / "notebook_runs" / f"{kind}_{CONFIG}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"


RUN_LCKD = run_dir(cfg, "lckd")
print(f"lckd_kit {lckd_kit.__version__}, torch {torch.__version__}, device {DEVICE}, {torch.get_num_threads()} "
      f"thread(s)\\nconfig '{CONFIG}': {cfg.stage1_steps} + {cfg.stage2_steps} steps, election every "
      f"{cfg.elect_every}\\nphantoms: {train_dir}\\nheld-out: {test_dir}\\nLCKD run folder: {RUN_LCKD}")
"""


def nb02():
    name = "02_teacher_election.ipynb"
    return name, notebook(name, [
        md(f"""
# 02 · Teacher election: why some modalities matter more

{colab_badge(name)}

Four modalities are not four equal witnesses. For each tumour region one of them sees it best, and
LCKD makes use of that. During training it **elects** a teacher for each region: the modality that
segments the region best *on its own*. Every other modality is then pulled toward the teachers'
features, so the model copes when a teacher is missing. This notebook runs that election and
explains its outcome.

**Learning goals.** After this notebook you can:

1. explain from the images why T1ce shows the enhancing tumour and FLAIR the whole tumour;
2. measure how well each modality *alone* outlines each region, first without any network (a
   brightness threshold) and then with the LCKD network (single-modality inference);
3. run the teacher election and read its 4 × 3 score table;
4. say why the election is repeated during training rather than fixed once.

*Time:* under a minute on a laptop CPU with the shipped checkpoint (the default). Without it the
notebook trains stage 1 of a small model itself, which notebook 03 then continues: about 2 minutes
more. `FAST = True`: well under a minute.
"""),
        md(SETUP_MD),
        code(SETUP_CODE),
        md(PARAMS_MD + """

Notebook 03 continues the training started here, provided `SEED`, `N_PHANTOMS`, `GRID`, `CONFIG` and
`CPU_OVERRIDES` are the same in both notebooks."""),
        code("""
SEED = 0              # phantoms and training seed
N_PHANTOMS = 24       # training + validation phantoms (the set of notebook 01)
GRID = 96             # 96^3 voxels of 2 mm
CHECKPOINT = "auto"   # "auto": the shipped checkpoints/lckd_small_phantom.pt if present, else train stage 1 here;
                      # "" : always train here; or the path of any run's .pt file
CONFIG = "auto"       # "auto": "small" (3-D) on a GPU, "small2d" (2-D slices) on a CPU; or a TRAIN_CONFIGS name
CPU_OVERRIDES = dict()  # changes to the config on a CPU: none, small2d's own 300 + 300 steps take about 2 min
                      # per model on 2 cores; on a slow laptop e.g. dict(stage1_steps=100, stage2_steps=100, elect_every=50)
N_TEST = 3            # held-out phantoms for the election shown here
DEVICE = "auto"       # "auto", "cpu", "cuda", ...
THREADS = None        # torch CPU threads (None: torch's default; 1 can be faster on a busy machine)
FAST = False          # True: toy sizes, to check that the notebook runs (the tests set it)
""", "parameters"),
        md("""
The next cell applies the parameters. It picks the device and the training configuration, makes sure
the phantoms exist (cached by notebook 01) together with a held-out set the model never trains on,
and names the run folder that notebook 03 will continue.
"""),
        code(SETTINGS_02_03),
        md("""
## 1. Look first

Here is one held-out phantom, zoomed in on the tumour. The enhancing rim (ET, orange) is the
brightest thing on **T1ce** because gadolinium leaks where the blood–brain barrier is broken. On T1,
FLAIR and T2 the rim has no special brightness. The oedema around the core (the rest of WT, green)
is bright on **FLAIR** and on T2. On T2, however, the CSF in the ventricles is just as bright, while
FLAIR suppresses it. That single difference makes FLAIR the better witness for the whole tumour.
"""),
        code("""
test_cases = experiment.load_eval_cases(test_dir)[:N_TEST]      # z-scored images, region masks
case = max(test_cases, key=lambda c: int(c["label"][0].sum()))   # the case with the most ET
shown = np.where((case["image"] != 0).any(0), case["image"], np.nan)   # background black, not z = 0 grey
wt = np.argwhere(case["label"][2])
lo_, hi_ = np.maximum(wt.min(0) - 8, 0), wt.max(0) + 9
box = (slice(None), *(slice(a, b) for a, b in zip(lo_, hi_)))    # the tumour's bounding box + margin
viz.show_modalities(shown[box], case["label"][box], spacing=case["spacing"],
                    title=f"{case['name']} (zoomed on the tumour)")
""", "figure"),
        md("""
### A model-free election

Before training anything, try a crude question. If you mark the brightest voxels of **one** modality
as tumour, how well can you outline each region? For every modality and region the next cell tries
100 thresholds and keeps the best Dice. This is an election with no network at all. If the images
are informative in the way just described, T1ce should win ET and TC and FLAIR should win WT.
"""),
        code("""
def threshold_scores(image, regions, n=100):
    \"\"\"Best Dice of 'voxels brighter than t' for each modality x region (notebook-side, model-free).\"\"\"
    brain = (image != 0).any(0)
    scores = np.full((len(MODALITIES), len(REGIONS)), np.nan)
    for m in range(len(MODALITIES)):
        x = image[m][brain]
        ts = np.quantile(x, np.linspace(0.5, 0.999, n))
        n_above = len(x) - np.searchsorted(np.sort(x), ts, side="right")      # |x > t|
        for r in range(len(REGIONS)):
            inside = np.sort(x[regions[r][brain] > 0])
            if inside.size:
                hit = len(inside) - np.searchsorted(inside, ts, side="right")  # |x > t and in region|
                scores[m, r] = (2 * hit / (n_above + len(inside))).max()
    return scores

threshold_table = np.nanmean([threshold_scores(c["image"], c["label"]) for c in test_cases], axis=0)
viz.score_table_figure(threshold_table, title="No network: Dice of 'the brightest voxels' of one modality",
                       value_label="best-threshold Dice")
""", "figure"),
        md("""
A threshold draws no shapes: it cannot fill the dark necrotic centre of TC or tell a vessel from a
tumour. A network can learn both. The question stays the same, though: **which modality, alone,
carries the region?**

## 2. A network to ask

LCKD elects its teachers with the network it is training. The next cell either loads the shipped
checkpoint or trains **stage 1** of the LCKD recipe here. In stage 1 all four modalities are
present, and an election is held every `elect_every` steps on validation cases. The run is saved in
the cache, and notebook 03 continues it with stage 2.
"""),
        code("""
ckpt_path = None if not CHECKPOINT else Path(CHECKPOINT) if CHECKPOINT != "auto" else experiment.SHIPPED_CHECKPOINT
t0 = time.time()
if ckpt_path is not None and ckpt_path.is_file():
    model, ckpt = train.load_model(ckpt_path, DEVICE)
    model_cfg = train.train_config_from_dict(ckpt["config"])
    history = ckpt.get("history") or [dict(e, kind="election") for e in ckpt.get("elections", [])]
    source = f"checkpoint {ckpt_path.name}, trained {ckpt['step']} steps"
else:
    if CHECKPOINT not in ("", "auto"):
        raise FileNotFoundError(f"CHECKPOINT {ckpt_path} does not exist")
    result = train.train(cfg, train_dir, out_dir=RUN_LCKD, device=DEVICE, resume=True, max_steps=cfg.stage1_steps)
    model, model_cfg, history = result.model, result.config, result.history
    source = f"{RUN_LCKD.name}, {result.step} of {cfg.total_steps} steps"
model.eval()
roi = train.infer_roi_size(model_cfg, model.config.spatial_dims)   # the window the run validated with
print(f"model '{model.config.name}' ({model.config.spatial_dims}-D) from {source} ({time.time() - t0:.0f} s)")
"""),
        md("""
## 3. Single-modality inference

The LCKD network encodes each modality separately with one shared encoder. When a modality is
missing, its bottleneck slot is filled with the mean of the available ones. So the network can
segment from **any** subset, including a single modality. Below, the held-out case is segmented five
times: from each modality alone and from all four. Each panel shows the modality that was used. The
fill is the prediction, the outline is the truth, and the Dice per region is written under each panel.
If the T2-only panel paints the ventricles as whole tumour, you are looking at the CSF/oedema
confusion of section 1.
"""),
        code("""
SINGLES = election.SINGLES                      # (FLAIR only, T1 only, T1ce only, T2 only)
prob = evaluate.predict_subsets(model, case["image"], [*SINGLES, ALL_PRESENT], roi_size=roi, device=DEVICE,
                                crop_foreground=True)
preds = evaluate.nest_regions(prob > 0.5).numpy()


def show_subsets(image, truth, preds, masks, name, plane="axial"):
    \"\"\"One panel per modality subset: prediction filled, truth outlined, Dice (notebook-side figure).\"\"\"
    index = viz.best_slice(truth, plane)
    brain = viz.take_slice((image != 0).any(0), plane, index)
    fig = Figure(figsize=(3.1 * len(masks), 4.1), layout="constrained")
    for ax, p, mask in zip(fig.subplots(1, len(masks)), preds, masks):
        m = 0 if all(mask) else mask.index(True)
        lo, hi = viz.intensity_window(image[m])
        ax.set_facecolor("black")
        ax.imshow(np.where(brain, viz.take_slice(image[m], plane, index), np.nan), cmap="gray", vmin=lo, vmax=hi)
        viz.overlay_regions(ax, viz.take_slice(p, plane, index), alpha=0.5)
        viz.overlay_regions(ax, viz.take_slice(truth, plane, index), style="contour", linewidth=1.2)
        d = viz.dice_per_region(truth, p)
        ax.set_title("all four" if all(mask) else viz.pretty_subset(mask) + " only", fontsize=12, fontweight="bold")
        ax.set_xlabel("Dice  " + "  ".join(f"{r} {d[r]:.2f}" for r in REGIONS), fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(handles=viz.region_handles("fill"), loc="outside lower center", ncol=3, frameon=False)
    fig.suptitle(f"{name}: one modality at a time (fill = prediction, outline = truth)", fontsize=13)
    return fig

show_subsets(case["image"], case["label"], preds, [*SINGLES, ALL_PRESENT], case["name"])
""", "figure"),
        md("""
## 4. The election

The election runs this single-modality inference on a few cases and averages the Dice of each
modality for each region. That gives a 4 × 3 table, and for each region the best modality wins
(★). The **teachers** are the set of winners, so there is one teacher if a single modality wins all
three regions and at most three. Here the election runs on held-out cases; during training it runs
on the validation split.
"""),
        code("""
res = election.elect_teachers(model, test_cases, roi_size=roi, device=DEVICE, crop_foreground=True)
print(res)
assert res.scores.shape == (4, 3) and set(res.winners) == set(REGIONS) and any(res.teachers)
assert np.all((res.scores >= 0) & (res.scores <= 1))
viz.score_table_figure(res.scores, res.winners,
                       title=f"Teacher election on {res.n_cases} held-out case(s): Dice of each modality alone")
""", "figure"),
        md("""
Mind the scale. After a few dozen CPU steps the network's single-modality Dice can be far *below*
the brightness threshold of section 1. That does not spoil the election, which only needs the
*ranking* of the modalities, and the ranking appears long before the segmentations are good. Here
is what the election says, in words, next to what the images led us to expect (T1ce for ET and TC,
FLAIR for WT):
"""),
        code("""
expected = {"ET": "t1ce", "TC": "t1ce", "WT": "flair"}
lines = []
for r in REGIONS:
    got = MODALITIES[res.winners[r]]
    runner_up = sorted(range(4), key=lambda m: -res.scores[m, REGIONS.index(r)])[1]
    margin = res.scores[res.winners[r], REGIONS.index(r)] - res.scores[runner_up, REGIONS.index(r)]
    verdict = "as expected" if got == expected[r] else f"expected {viz.display_name(expected[r])}"
    lines.append(f"* **{r}**: {viz.display_name(got)} wins by {margin:.3f} Dice over "
                 f"{viz.display_name(runner_up)} ({verdict}).")
lines.append(f"* Teachers: **{', '.join(viz.display_name(t) for t in res.teacher_names)}**; the threshold "
             "table of section 1 elected " + ", ".join(
                 f"{r} {viz.display_name(int(np.nanargmax(threshold_table[:, i])))}" for i, r in enumerate(REGIONS)) + ".")
if any(MODALITIES[res.winners[r]] != expected[r] for r in REGIONS):
    lines.append("* A surprise may simply mean the model is still young (a few dozen CPU steps) or that only a "
                 "few cases were scored: look at the margins. Rerun with the shipped checkpoint or more steps.")
display(Markdown("\\n".join(lines)))
"""),
        md("""
## 5. Why T1ce and FLAIR

* **ET → T1ce.** Enhancement *is* the definition of ET. A voxel is ET because it lights up after
  gadolinium, and no other sequence carries that information. Without T1ce, ET has to be guessed
  from shape and context.
* **TC → usually T1ce.** The core is the enhancing rim plus what it encloses. On T1ce the rim draws
  the outline of the core, and the dark necrosis inside it is easy to fill in.
* **WT → FLAIR.** The whole tumour is mostly oedema, which is bright on FLAIR *and* T2. FLAIR
  suppresses the CSF, so only the abnormal water stays bright. On T2 the ventricles and sulci look
  like tumour.
* **T1 rarely wins anything.** Before contrast the tumour is only slightly darker than the white
  matter.

The same ranking is reported for real BraTS data, and it is why LCKD elects T1ce and FLAIR as
teachers. The phantoms were built so that it holds. With real data you would run this very notebook
on your own cases (`BRATS_DIR` in notebook 01; `data.find_cases` + `experiment.load_eval_cases`).

## 6. Elections during training

The teachers are not chosen once. LCKD re-elects every few thousand steps (here every
`cfg.elect_every` steps), because the network's single-modality skills change as it learns. Early on all Dice scores
are near zero and the winner is almost random. The reference code starts with FLAIR as the teacher
before the first election. The timeline shows who taught which region when, in this run.
"""),
        code("""
elections = [r for r in history if r.get("kind") == "election"]
print(f"{len(elections)} election(s) in this run's history:",
      "; ".join(f"step {e['step']}: {'+'.join(e['teachers'])}" for e in elections))
assert elections, "the run holds no election"
viz.plot_teacher_timeline(history)
""", "figure"),
        md("""
## Exercises

Worked solutions: [`solutions/02_solutions.md`](solutions/02_solutions.md).

1. **Soft or hard Dice?** The reference code elects with a *soft* Dice on probabilities
   (`metric="soft"`); the kit's default is the thresholded Dice. Run `election.elect_teachers(...,
   metric="soft")` on the same cases. Do the winners change? Which metric would you trust with a
   half-trained model, and why?
2. **How many cases?** Run the election on 1, 2 and 3 held-out cases, and on each case alone. How
   often does the winner of each region change? What does that tell you about electing on a small
   validation set?
3. **Ties and margins.** Write a function that returns, for each region, the margin between the
   winner and the runner-up. Which region's election is the least certain in your run?
4. **Dark voxels.** The tumour core looks *dark* on T1. Compute the threshold table of section 1 on
   six *training* phantoms, once as it is and once with T1's sign flipped (so the table scores T1's
   darkest voxels). Does T1 now win any region? What does this say about a threshold as a model?
"""),
    ])


# =============================================================================================
# 03 -- distillation training
# =============================================================================================

def nb03():
    name = "03_distillation_training.ipynb"
    return name, notebook(name, [
        md(f"""
# 03 · Training with cross-modal distillation

{colab_badge(name)}

LCKD trains one network in two stages. Stage 1 is a warm-up with all four modalities. In stage 2 a
random subset of one to three modalities is given at each step. Throughout, a **distillation loss**
pulls every modality's bottleneck feature toward the elected teachers' features. This notebook
trains LCKD and, as an ablation, the same network **without distillation**. It watches both train
live and then compares them on held-out cases for all 15 subsets of available modalities.

**Learning goals.** After this notebook you can:

1. write down the LCKD loss and the two-stage schedule, and say what each part is for;
2. monitor a run while it trains (loss terms, validation Dice, teacher timeline);
3. evaluate a model over all 15 modality subsets and read the heatmaps;
4. judge whether a difference between two models is larger than its noise.

*Time:* 5–6 minutes on a laptop CPU: two short runs of the 2-D model and their evaluation. On a GPU
the 3-D `small` configuration trains instead. `FAST = True`: well under a minute.
"""),
        md(SETUP_MD),
        code(SETUP_CODE),
        md(PARAMS_MD + """

This notebook **continues** the run whose stage 1 notebook 02 trained, provided `SEED`, `N_PHANTOMS`,
`GRID`, `CONFIG` and `CPU_OVERRIDES` are the same in both notebooks. Otherwise it
trains from the start. A finished run is cached, so a second execution of this notebook skips training."""),
        code("""
SEED = 0              # phantoms and training seed
N_PHANTOMS = 24       # training + validation phantoms (the set of notebook 01)
GRID = 96             # 96^3 voxels of 2 mm
CONFIG = "auto"       # "auto": "small" (3-D) on a GPU, "small2d" (2-D slices) on a CPU; or a TRAIN_CONFIGS name
CPU_OVERRIDES = dict()  # changes to the config on a CPU: none, small2d's own 300 + 300 steps take about 2 min
                      # per model on 2 cores; on a slow laptop e.g. dict(stage1_steps=100, stage2_steps=100, elect_every=50)
N_TEST = 3            # held-out phantoms for the 15-subset comparison
PLOT_EVERY = 10       # redraw the live plot every this many steps
HD95 = False          # also compute HD95 (slower)
DEVICE = "auto"       # "auto", "cpu", "cuda", ...
THREADS = None        # torch CPU threads (None: torch's default; 1 can be faster on a busy machine)
FAST = False          # True: toy sizes, to check that the notebook runs (the tests set it)
""", "parameters"),
        md("""
The next cell applies the parameters, exactly as in notebook 02. It picks the device and
configuration, makes sure the phantoms and the held-out set exist, and names the run folders.
"""),
        code(SETTINGS_02_03),
        md("""
## 1. The recipe

For a batch with available modalities $A$ and teachers $T$ (the union of the elected winners):

$$\\mathcal{L} = \\underbrace{\\text{Dice} + \\text{BCE}}_{\\text{segmentation, ET/TC/WT}}
\\; + \\; 0.1 \\sum_{t \\in T \\cap A} \\; \\sum_{s \\in A} \\operatorname{L1}\\big(f_s, \\operatorname{sg}(f_t)\\big)$$

where $f_m$ is modality $m$'s bottleneck feature from the shared encoder, L1 is the mean absolute
difference over all feature elements, and $\\operatorname{sg}$ stops the gradient, so the teacher
is not pulled toward the students.

* **Stage 1** (warm-up): all four modalities, loss as above.
* **Stage 2** (missing modalities): each step keeps $k \\in \\{1, 2, 3\\}$ modalities ($k$ uniform),
  then a uniform subset of that size. Never all four.
* **Election** every `elect_every` steps, as in notebook 02.
* The learning rate decays polynomially over the *whole* run, so it jumps back up when stage 2 starts
  (the reference behaves this way).

The run's configuration:
"""),
        code("""
show = ["model", "roi_size", "batch_size", "stage1_steps", "stage2_steps", "elect_every", "optimizer", "lr",
        "kd_weight", "kd_distance", "initial_teachers"]
display(Markdown("| setting | value |\\n|---|---|\\n" + "\\n".join(
    f"| `{k}` | {getattr(cfg, k)} |" for k in show)))
"""),
        md("""
The schedule and the stage-2 subsets, drawn with the training loop's own functions (`train.lr_at`,
`train.sample_subset`). Each single and each triple turns up in 1/12 of the stage-2 steps, each pair
in 1/18.
"""),
        code("""
steps = np.arange(cfg.total_steps)
rng = np.random.default_rng(0)
draws = [train.sample_subset(rng) for _ in range(6000)]
sizes = np.array([sum(d) for d in draws])
fig = Figure(figsize=(11, 3.2), layout="constrained")
ax_lr, ax_k = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=[2, 1]))
ax_lr.plot(steps, [train.lr_at(int(s), cfg) for s in steps], color="#444444", lw=2)
ax_lr.axvspan(cfg.stage1_steps, cfg.total_steps, color="#EEEEEE", zorder=0)
ax_lr.text(cfg.stage1_steps, ax_lr.get_ylim()[1], "  stage 2: random missing modalities", va="top", fontsize=9)
ax_lr.set(xlabel="step", ylabel="learning rate", title="Learning-rate schedule")
ax_k.bar(["1", "2", "3", "4"], [np.mean(sizes == k) for k in (1, 2, 3, 4)], color="#0072B2")
ax_k.set(xlabel="modalities kept", ylabel="share of stage-2 steps", title="Stage-2 subsets")
fig
""", "figure"),
        md("""
## 2. Train LCKD and watch it

`train.train(..., callback=...)` calls the callback with every history record: the mean losses every
few steps, each election, and each validation Dice. The callback below collects the records and
redraws `viz.plot_history` in place every `PLOT_EVERY` steps. The four panels show the loss terms
(the KD term in orange), the learning rate, the validation Dice with all modalities, and the teacher
timeline. If notebook 02 ran first, stage 1 is already in the run folder and training continues with
stage 2. You can interrupt the training (■ in the toolbar): the run is saved at the last completed
step, and running the cell again continues from there.
"""),
        code("""
def live_history(records, title, every, panels="history"):
    \"\"\"A display handle redrawn from the growing history; returns the train() callback.\"\"\"
    def draw():
        if panels == "history":
            return viz.plot_history(records, title=title)
        fig = Figure(figsize=(10, 5.6), layout="constrained")
        ax_loss, ax_val = fig.subplots(2, 1, sharex=True)
        viz.plot_loss(records, ax=ax_loss)
        viz.plot_val_dice(records, ax=ax_val)
        fig.suptitle(title, fontsize=13, fontweight="bold")
        return fig

    handle = display(draw(), display_id=True)

    def callback(step, record):
        records.append(record)
        if record["kind"] == "val" or (record["kind"] == "step" and step % every == 0):
            handle.update(draw())
    return callback


every = max(PLOT_EVERY, cfg.log_every)
records = [r for r in train.read_history(RUN_LCKD)]   # what an earlier session (notebook 02) trained
t0 = time.time()
lckd = train.train(cfg, train_dir, out_dir=RUN_LCKD, device=DEVICE, resume=True, progress=False,
                   callback=live_history(records, "LCKD (with distillation)", every))
lckd_seconds = time.time() - t0
print(f"LCKD: {lckd.step} steps, final teachers {'+'.join(lckd.teacher_names)}, {lckd_seconds:.0f} s this session")
assert lckd.step == cfg.total_steps and any(r["kind"] == "step" and r["stage"] == 2 for r in lckd.history)
""", "figure"),
        md("""
The teacher timeline on its own. Each strip is a region, each colour the modality elected for it,
and each ▼ an election. Stage 2 is shaded. Teachers that change a lot early on and settle later are
the usual picture.
"""),
        code("""
viz.plot_teacher_timeline(lckd.history)
""", "figure"),
        md("""
## 3. The baseline: the same network without distillation

An ablation is only fair if nothing else changes. The baseline below uses the same configuration,
seed, batches, crops, modality subsets and learning rate, with `no_kd=True`, so its KD term is zero.
Its elections only measure its validation Dice, since nobody learns from its teachers. That is why it
holds them less often (at the end of each stage), which saves time and changes nothing else.
"""),
        code("""
cfg_base = train.get_train_config(cfg, no_kd=True, elect_every=max(cfg.stage1_steps, 1))
RUN_BASE = run_dir(cfg_base, "nokd")
records_base = [r for r in train.read_history(RUN_BASE)]
t0 = time.time()
base = train.train(cfg_base, train_dir, out_dir=RUN_BASE, device=DEVICE, resume=True, progress=False,
                   callback=live_history(records_base, "no-KD baseline", every, panels="loss"))
base_seconds = time.time() - t0
print(f"no-KD: {base.step} steps, {base_seconds:.0f} s this session")
assert all(r["kd"] == 0 for r in base.history if r["kind"] == "step")
""", "figure"),
        md("""
Both runs side by side. The loss panel compares only the segmentation part (Dice + BCE), because the
baseline has no KD term.
"""),
        code("""
viz.compare_histories(lckd.history, base.history, labels=("LCKD", "no-KD"))
""", "figure"),
        md("""
## 4. Fifteen ways to be missing modalities

At test time any non-empty subset of the four modalities can be present: 4 singles, 6 pairs,
4 triples and all four, which makes 15 subsets. `evaluate.evaluate` encodes each held-out case
**once** and decodes all 15 subsets from that one encoding. It then scores ET, TC and WT per subset.
The result is the paper's main table, drawn here as heatmaps: one row per subset, with ● marking
the available modalities.
"""),
        code("""
eval_cases = experiment.load_eval_cases(test_dir)[:N_TEST]
roi = train.infer_roi_size(cfg, lckd.model.config.spatial_dims)
t0 = time.time()
ev_lckd = evaluate.evaluate(lckd.model, eval_cases, roi_size=roi, device=DEVICE, crop_foreground=True, hd95=HD95)
ev_base = evaluate.evaluate(base.model, eval_cases, roi_size=roi, device=DEVICE, crop_foreground=True, hd95=HD95)
print(f"evaluated 2 models x {len(eval_cases)} held-out cases x 15 subsets in {time.time() - t0:.0f} s")
dice_lckd, dice_base = ev_lckd.dice_table(), ev_base.dice_table()
assert dice_lckd.shape == dice_base.shape == (15, 3)
ev_lckd.heatmap(title=f"LCKD: Dice on {len(eval_cases)} held-out case(s)")
""", "figure"),
        md("""
The baseline on the same cases, drawn the same way. Compare the rows with T1ce (●) in the third
column against those without it (○).
"""),
        code("""
ev_base.heatmap(title=f"no-KD baseline: Dice on {len(eval_cases)} held-out case(s)")
""", "figure"),
        md("""
The difference, LCKD − baseline. Blue cells mean LCKD is better, red cells mean the baseline is.
Look in particular at the rows **without T1ce** (ET and TC) and **without FLAIR** (WT). These are
the rows where distillation from the teachers is supposed to help.
"""),
        code("""
viz.subset_heatmap(dice_lckd - dice_base, diff=True, show_mean=True,
                   title="LCKD − no-KD: Dice difference per subset (blue = LCKD better)")
""", "figure"),
        md("""
The same numbers as paper-style tables (● available, ○ missing):
"""),
        code("""
display(Markdown(ev_lckd.markdown(title="LCKD", hd95=HD95)))
display(Markdown(ev_base.markdown(title="no-KD baseline", hd95=HD95)))
"""),
        md("""
## 5. What the numbers show, and what they don't

The kit's experiment module turns the two tables into sentences. It compares subset groups and
gives each difference its standard error over the paired held-out cases:
"""),
        code("""
sentences = experiment.what_the_numbers_show(ev_lckd.per_case()[None], ev_base.per_case()[None],
                                             elections=[lckd.elections[-1].to_record()] if lckd.elections else ())
display(Markdown("\\n".join(f"* {s}" for s in sentences)))
"""),
        md("""
Before concluding anything, remember how these numbers were made:

* **Short training.** On a CPU both runs are a few minutes long, far from converged. The reference
  trains 115 000 steps on a GPU. Differences between half-trained models say more about training
  speed than about the method.
* **Few test cases, one seed.** With three cases a standard error of several Dice points is normal,
  and a second seed can flip the sign of a small difference. `lckd-kit experiment --seeds 0 1 2`
  repeats the comparison properly.
* **Phantoms are not patients.** The phantom contrasts were designed to follow the real ranking of
  modalities, but the size of the effect on real BraTS data has to be measured on real BraTS data.

What to expect with enough training (the paper's claim): the largest gains where a teacher is
missing, i.e. ET/TC without T1ce and WT without FLAIR, and little change when all four modalities
are there.

## Exercises

Worked solutions: [`solutions/03_solutions.md`](solutions/03_solutions.md).

1. **A second seed.** Set `SEED = 1` (both runs retrain into new folders) and compare the difference
   heatmap with seed 0. Which differences keep their sign? Use that to say which cells of the
   seed-0 heatmap you would report.
2. **KD weight.** Train LCKD with `kd_weight=1.0` instead of 0.1 (use `train.get_train_config(cfg,
   kd_weight=1.0)` and a new run folder). What happens to the KD term, the segmentation loss and the
   single-modality rows of the table?
3. **Fixed teachers.** Disable the election (`elect_every` larger than the run, and
   `elect_at_end=False`) with `initial_teachers=("t1",)`: the weakest modality teaches all the time.
   How does that compare with the elected teachers?
4. **Where does the time go?** Time one training step, one election and one 15-subset evaluation of
   a case (`time.perf_counter`). Which part would you shrink first to fit a 10-minute workshop slot,
   and what would it cost?
"""),
    ])


# =============================================================================================
# 04 -- missing-modality explorer
# =============================================================================================

def nb04():
    name = "04_missing_modality_explorer.ipynb"
    return name, notebook(name, [
        md(f"""
# 04 · The missing-modality explorer

{colab_badge(name)}

What does the model see when T1ce is missing? This notebook is hands-on. You switch modalities on
and off, move through the volume and watch the prediction and its Dice change. The model is encoded
**once** per case, and every toggle is just a cheap decode. Finally it shows the Dice of all 15
subsets at once and a 3-D view of the tumour.

**Learning goals.** After this notebook you can:

1. predict, and then check, which regions suffer when each modality is missing;
2. tell a change in the *prediction* from a change in the *Dice* (and find the slices that drive it);
3. use the feature blend to probe what the model takes from each modality's bottleneck feature,
   and say why it is an exploration of the model and not a physical quantity;
4. load any trained checkpoint into the explorer.

*Time:* about a minute with the shipped weights or a run from notebook 03 (`FAST = True`: about 20 s).
Without either, a toy model is trained for a few seconds, and its predictions will be poor.
"""),
        md(SETUP_MD),
        code(SETUP_CODE),
        md(PARAMS_MD),
        code("""
CHECKPOINT = "auto"   # "auto": the shipped checkpoints/lckd_small_phantom.pt, else the newest LCKD run of
                      # notebook 03, else a toy model trained here; or the path of any run's .pt file
CASE = ""             # a case folder (any layout data.find_cases reads); "" = the first bundled demo case
PLANE = "axial"       # starting plane: "axial", "coronal" or "sagittal"
DEVICE = "auto"       # "auto", "cpu", "cuda", ...
THREADS = None        # torch CPU threads (None: torch's default; 1 can be faster on a busy machine)
FAST = False          # True: toy sizes, to check that the notebook runs (the tests set it)
""", "parameters"),
        md("""
The next cell applies the parameters and imports the kit.
"""),
        code("""
%matplotlib inline
import time

import numpy as np
import torch
from IPython.display import Markdown, display

import lckd_kit
from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, SUBSETS, experiment, phantom, train, viz, widgets

DEVICE = ("cuda" if torch.cuda.is_available() else "cpu") if DEVICE == "auto" else DEVICE
if THREADS or FAST:
    torch.set_num_threads(THREADS or 1)
GRID = 32 if FAST else 96   # FAST: toy 32^3 phantoms
print(f"lckd_kit {lckd_kit.__version__}, torch {torch.__version__}, device {DEVICE}")
"""),
        md("""
## 1. A model

By default the explorer uses the **shipped checkpoint**, a small LCKD model trained on phantoms. If
it is missing, it takes the newest LCKD run of notebook 03 from the cache. If there is no such run
either, it trains the seconds-long `tiny` configuration so that the notebook still works. You can
point `CHECKPOINT` at any run's `final.pt` or `last.pt`, for example the no-KD baseline of notebook 03.
"""),
        code("""
runs = sorted((phantom.default_cache_dir() / "notebook_runs").glob("lckd_*/final.pt"), key=lambda p: p.stat().st_mtime)
if CHECKPOINT not in ("", "auto"):
    ckpt_path = Path(CHECKPOINT)
elif experiment.SHIPPED_CHECKPOINT.is_file():
    ckpt_path = experiment.SHIPPED_CHECKPOINT
else:
    ckpt_path = runs[-1] if runs else None
t0 = time.time()
if ckpt_path is not None:
    model, ckpt = train.load_model(ckpt_path, DEVICE)
    source = f"{ckpt_path} (step {ckpt['step']})"
else:  # nothing trained yet: a toy model, so that the explorer still works (its predictions are poor)
    toy_dir = phantom.ensure_phantoms(4, seed=0, grid=GRID, progress=False)
    model = train.train("tiny", toy_dir, device=DEVICE, progress=False).model
    source = "a toy model trained just now (8 steps of the 'tiny' config): expect poor predictions"
print(f"model '{model.config.name}' ({model.config.spatial_dims}-D) from {source} ({time.time() - t0:.0f} s)")
"""),
        md("""
## 2. The explorer

Things to try, each one a question:

* **Toggle T1ce off.** Which region loses the most Dice? Does the prediction shrink, grow or move?
* **Toggle FLAIR off** with T1ce on. Which region suffers now?
* **Keep only T1.** How much of the tumour can the model still find?
* **Turn all modalities off.** The explorer refuses and keeps the last view, because a prediction
  from nothing is not defined.
* Move the **slice** and switch the **plane**: a Dice change is often driven by a few slices at the
  edge of the tumour.

The large panel shows the prediction as a fill and the truth as an outline. The thumbnails show the
four modalities, crossed out when they are missing. The buttons under the image draw the Dice
heatmap of all 15 subsets and a 3-D view.
"""),
        code("""
# None: the first bundled demo case (96^3, what trained models know); FAST with the toy model: a 32^3 phantom
case = CASE or (phantom.make_case(seed=5, grid=GRID) if FAST and ckpt_path is None else None)
t0 = time.time()
state = widgets.ExplorerState.from_case(model, case, device=DEVICE)
ex = widgets.Explorer(state, plane=PLANE)
display(ex)
print(f"{state.name}: {'x'.join(map(str, state.shape))} voxels, first view in {time.time() - t0:.1f} s")
assert ex.image.value and ex.render_count >= 1, "the explorer did not render"
""", "widget"),
        md("""
## 3. The same questions, answered in code

Widgets are for exploring. When you want numbers for a slide, ask the explorer's state directly.
It decodes any subset from the one encoding and caches the result. The table below gives the Dice
of this case with all modalities, without each one in turn, and with each one alone.
"""),
        code("""
full = tuple(ALL_PRESENT)
masks = [full] + [tuple(m != k for m in range(4)) for k in range(4)] + [tuple(m == k for m in range(4)) for k in range(4)]
rows = ["| available | ET | TC | WT |", "|---|--:|--:|--:|"]
for mask in masks:
    d = state.dice(mask)
    label = "all four" if mask == full else (f"without {viz.display_name(mask.index(False))}" if sum(mask) == 3
                                              else f"{viz.display_name(mask.index(True))} only")
    rows.append(f"| {viz.availability_marks(mask)} {label} | " + " | ".join(f"{d[r]:.3f}" for r in REGIONS) + " |")
display(Markdown("\\n".join(rows)))
"""),
        md("""
Clicking from code works too. This switches the explorer above to **without T1ce**; scroll up to see
the view change. Then it switches all modalities off, which shows the warning, and restores them.
"""),
        code("""
before = ex.render_count
ex.toggles[MODALITIES.index("t1ce")].value = False
assert ex.available == (True, True, False, True) and ex.render_count == before + 1
print("now showing:", viz.pretty_subset(ex.available), "| Dice",
      ", ".join(f"{r} {v:.3f}" for r, v in state.dice(ex.available).items()))

for t in ex.toggles:          # nothing selected: a warning, and the last valid view stays
    t.value = False
assert widgets.WARNING_TEXT in ex.warning.value and ex.warning.layout.display != "none"
print("all off ->", widgets.WARNING_TEXT)
for t in ex.toggles:
    t.value = True
ex.toggles[MODALITIES.index("t1ce")].value = False   # leave the explorer on "without T1ce"
assert ex.warning.layout.display == "none"
"""),
        md("""
For a slide or a handout you want a picture, not a widget. `widgets.render_view` draws any view of
the explorer as an ordinary figure. Here is "without T1ce" at the explorer's current plane and slice.
`fig.savefig("without_t1ce.png", dpi=150)` writes it to a file.
"""),
        code("""
widgets.render_view(state, (True, True, False, True), plane=ex.plane.value, index=ex.slice_slider.value)
""", "figure"),
        md("""
## 4. The feature blend (an exploration of the model, not a physical quantity)

The blend sliders do **not** change the images, the scanner or the contrast agent. They change what
happens *inside* the network. For each selected modality $m$, its bottleneck feature is replaced by

$$ w_m f_m + (1 - w_m)\\,\\bar f, \\qquad \\bar f = \\text{mean of the selected modalities' features} $$

where $\\bar f$ is the very vector the model puts in the slot of a missing modality. At $w_m = 1$ you
get the plain prediction. At $w_m = 0$ modality $m$'s deep summary is swapped for the average, while
its skip connections (its fine detail) stay its own. So "T1ce at 0" is **not** the same as
"without T1ce". The comparison below shows how much of the model's use of T1ce runs through the
bottleneck.
"""),
        code("""
blend = (1.0, 1.0, 0.0, 1.0)    # all four selected; T1ce's bottleneck replaced by the mean
compare = {
    "all four": state.dice(full),
    "all four, T1ce blend 0": state.dice(full, blend=blend),
    "without T1ce": state.dice((True, True, False, True)),
}
display(Markdown("| | ET | TC | WT |\\n|---|--:|--:|--:|\\n" + "\\n".join(
    f"| {k} | " + " | ".join(f"{v[r]:.3f}" for r in REGIONS) + " |" for k, v in compare.items())))
"""),
        md("""
## 5. All 15 subsets at once, and the tumour in 3-D

The Dice of this one case for every subset of modalities, as an interactive heatmap (hover over a
row for its name). The explorer's **Dice for all 15 subsets** button draws the same heatmap inside
the widget and frames the subset currently selected.
"""),
        code("""
fig = ex.heatmap_plotly()      # the figure the explorer's "Dice for all 15 subsets" button draws
table = state.all_subset_dice()
assert table.shape == (15, 3) and np.all((table >= 0) & (table <= 1))
fig
""", "plotly"),
        md("""
The tumour in 3-D: the prediction of the subset selected in the explorer is drawn as translucent
surfaces (WT ⊃ TC ⊃ ET), and the truth as dots on its boundary. Drag to rotate, and use the buttons
to show the truth, the prediction or both. The explorer's **Show 3D** button draws the subset that
is selected at the time you click.
"""),
        code("""
fig3d = ex.view3d_plotly()     # the figure of the explorer's "Show 3D" button
assert fig3d is not None and len(fig3d.data) > 0
fig3d
""", "plotly"),
        md("""
## 6. Any checkpoint, any case

The explorer takes any kit checkpoint and any case folder in one call:

```python
ex2 = widgets.explorer("/path/to/BraTS2021_00000", checkpoint="runs/lckd/final.pt")
```

A good exercise is to open the no-KD baseline of notebook 03 next to LCKD on the same case and
compare them without T1ce. Real BraTS volumes (240 × 240 × 155) are larger than a phantom. With the
3-D paper model the explorer then falls back to sliding-window inference of all 15 subsets at once,
which takes longer for the first view. Every toggle after that is instant.

## Exercises

Worked solutions: [`solutions/04_solutions.md`](solutions/04_solutions.md).

1. **Rank the losses.** Using `state.dice`, rank the four modalities by how much *removing* each one
   (from all four) costs the mean Dice of ET, TC and WT. Does the ranking match the teachers elected
   in notebook 02?
2. **One slice, two answers.** Find the axial slice where the prediction without FLAIR differs most
   from the prediction with all four (`state.prediction(mask)` gives the 3-D masks). Show it in the
   explorer. Which region's boundary moved?
3. **Blend sweep.** For T1ce, sweep the blend weight from 0 to 1 in steps of 0.25 with all four
   modalities selected and plot ET Dice against the weight. Is the curve monotonic? Explain why a
   weight of 0 is not the same as removing T1ce.
4. **LCKD against the baseline.** Load the no-KD baseline of notebook 03 (its run folder's `final.pt`,
   in the cache's `notebook_runs/nokd_*`) into a second explorer on the same case. Compare the two for
   "T1ce only" and "without T1ce". Where does distillation make a visible difference, if anywhere?
"""),
    ])


# =============================================================================================

BUILDERS = (nb01, nb02, nb03, nb04)


def build() -> dict[str, nbformat.NotebookNode]:
    """name -> notebook, as the builders define them."""
    return dict(b() for b in BUILDERS)


def text_of(nb: nbformat.NotebookNode) -> str:
    """The file content of a notebook (nbformat's JSON, one trailing newline)."""
    s = nbformat.writes(nb)
    return s if s.endswith("\n") else s + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a notebook differs from its source")
    ap.add_argument("--out", type=Path, default=NOTEBOOKS_DIR, help="folder to write to (default notebooks/)")
    args = ap.parse_args(argv)
    stale = []
    for name, nb in build().items():
        nbformat.validate(nb)
        path = args.out / name
        text = text_of(nb)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run python tools/build_notebooks.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
