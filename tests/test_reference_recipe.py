"""``--config paper`` is the reference run (billhhh/LCKD run.sh + train.py + BraTSDataSet.py), and
every remaining difference is documented.

The reference values below are read from its run.sh arguments and train.py constants (stage 1:
``--input_size 80,160,160 --batch_size 2 --num_steps 80000 --val_pred_every 5000
--learning_rate 1e-2 --num_workers 4 --train_list train_all --val_list val --mode 0,1,2,3``;
stage 2: ``--num_steps 115000 --mode random``, resumed; train.py: SGD momentum 0.99 Nesterov,
weight decay parsed but not applied, poly power 0.9, ``kd_wt`` 0.1, seed 999, teachers "0").
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lckd_kit import REGIONS
from lckd_kit.election import elect_teachers
from lckd_kit.model import CONFIGS
from lckd_kit.train import TRAIN_CONFIGS, split_for
from lckd_kit.transforms import augmentations, clip_upper_tail, normalize_image

README = Path(__file__).resolve().parents[1] / "README.md"

#: (what the reference says, its value, the kit's paper value)
P = TRAIN_CONFIGS["paper"]
M = CONFIGS["paper"]
REFERENCE_RUN = [
    ("--input_size (D, H, W)", (80, 160, 160), (P.roi_size[2], P.roi_size[0], P.roi_size[1])),
    ("--batch_size", 2, P.batch_size),
    ("--num_steps, stage 1", 80_000, P.stage1_steps),
    ("--num_steps, stage 2 (total, resumed)", 115_000, P.total_steps),
    ("--val_pred_every", 5_000, P.elect_every),
    ("--learning_rate", 1e-2, P.lr),
    ("lr_poly power", 0.9, P.poly_power),
    ("stage 2 continues the poly counter", "continue", P.stage2_schedule),
    ("SGD momentum (hard-coded)", 0.99, P.momentum),
    ("SGD nesterov", True, P.nesterov),
    ("optimizer", "sgd", P.optimizer),
    ("weight decay applied", 0.0, P.weight_decay),
    ("kd_wt", 0.1, P.kd_weight),
    ("kd loss nn.L1Loss, teach all, summed", ("l1", "all", "sum"), (P.kd_distance, P.kd_pairs, P.kd_reduction)),
    ("KD in stage 1 too", True, P.stage1_kd),
    ("--mode random: one subset per batch", "batch", P.stage2_sampling),
    ("--teachers default '0' (FLAIR)", ("flair",), P.initial_teachers),
    ("--num_workers", 4, P.num_workers),
    ("--train_list train_all: validation cases are trained on", "within", P.validation),
    ("--val_list: 57 of 285 cases", 57 / 285, P.val_fraction),
    ("election: soft Dice of the sigmoid of window-averaged logits", ("soft", "logits"),
     (P.elect_metric, P.elect_average)),
    ("no AMP (fp32)", "off", P.amp),
    ("truncate(): tail clip, then z-score", "clip_zscore", P.normalization),
    ("BraTSDataSet + batchgenerators augmentation", "reference", P.augment),
    ("torch.manual_seed(999)", 999, P.seed),
    ("--weight_std True", True, M.weight_std),
    ("--norm_cfg IN, --activation_cfg LeakyReLU (0.01)", 0.01, M.negative_slope),
]


@pytest.mark.parametrize("what, reference, kit", REFERENCE_RUN, ids=[r[0] for r in REFERENCE_RUN])
def test_paper_config_equals_the_reference_run(what, reference, kit):
    assert kit == pytest.approx(reference) if isinstance(reference, float) else kit == reference


def test_readme_lists_every_remaining_difference():
    """The deliberate differences (TrainConfig fields the paper config sets otherwise than the
    reference would) are each named in the README's list."""
    text = README.read_text().split("## Faithful by default", 1)[1].split("\n## ", 1)[0]
    for phrase in ("ASPP", "step 0", "restart from FLAIR", "−1", "state_dict", "seed", "brain", "hard Dice",
                   "held out", "mixed precision", "reference_recipe.md"):
        assert phrase in text, phrase


# ------------------------------------------------------------------------------ the augmentation


def _find(ts, name):
    return [t for t in ts if type(t).__name__ == name]


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_reference_augmentation_probabilities_and_ranges(spatial_dims):
    ts = augmentations("reference", spatial_dims)
    zooms = _find(ts, "RandZoomd")
    # crop rescale U(0.9, 1.1) with p 0.5, then batchgenerators' scale (0.85, 1.25) with p 0.2
    assert [(z.prob, z.rand_zoom.min_zoom[0], z.rand_zoom.max_zoom[0]) for z in zooms] == [
        (0.5, pytest.approx(1 / 1.1), pytest.approx(1 / 0.9)), (0.2, pytest.approx(1 / 1.25), pytest.approx(1 / 0.85))]
    assert len(_find(ts, "RandFlipd")) == spatial_dims and all(f.prob == 0.5 for f in _find(ts, "RandFlipd"))
    rot = _find(ts, "RandAffined")[0]
    assert rot.prob == 0.2 and np.allclose(np.abs(rot.rand_affine.rand_affine_grid.rotate_range), np.deg2rad(15))
    elastic = _find(ts, "Rand3DElasticd" if spatial_dims == 3 else "Rand2DElasticd")[0]
    assert elastic.prob == 0.2
    if spatial_dims == 3:
        assert elastic.rand_3d_elastic.sigma_range == (9.0, 13.0)
        assert elastic.rand_3d_elastic.magnitude_range == (0.0, 900.0)
    noise = _find(ts, "RandGaussianNoised")[0]
    assert (noise.prob, noise.rand_gaussian_noise.std, noise.rand_gaussian_noise.sample_std) == (0.1, 0.1, True)
    per_channel = {type(t.transform).__name__: (t.prob, t.prob_per_channel) for t in _find(ts, "PerChannelRandd")}
    assert per_channel == {"RandGaussianSmooth": (0.2, 0.5), "RandShiftIntensity": (0.15, 0.5),
                           "RandSimulateLowResolution": (0.25, 0.5)}
    blur = next(t.transform for t in _find(ts, "PerChannelRandd") if type(t.transform).__name__ == "RandGaussianSmooth")
    assert blur.sigma_x == (0.5, 1.0)
    lowres = next(t.transform for t in _find(ts, "PerChannelRandd")
                  if type(t.transform).__name__ == "RandSimulateLowResolution")
    assert lowres.zoom_range == (0.5, 1.0)
    bright = _find(ts, "RandScaleIntensityd")[0]
    assert bright.prob == 0.15 and bright.scaler.factors == (-0.25, 0.25)  # x(0.75, 1.25)
    contrast = _find(ts, "RandScaleIntensityFixedMeand")[0]
    assert contrast.prob == 0.15 and contrast.fixed_mean and contrast.preserve_range
    gamma = _find(ts, "RandAdjustContrastd")[0]
    assert gamma.prob == 0.15 and gamma.adjuster.gamma == (0.7, 1.5) and gamma.adjuster.retain_stats
    # the scanner recipe is the reference plus a bias field
    assert len(augmentations("scanner", spatial_dims)) == len(ts) + 1


def test_augmentation_keeps_background_zero_and_labels_binary():
    from lckd_kit import phantom
    from lckd_kit.data import as_case
    from lckd_kit.transforms import train_transforms

    c = as_case(phantom.make_case(2, grid=32))
    t = train_transforms((16, 16, 16), spatial_dims=3, num_samples=8, augment="reference")
    t.set_random_state(seed=0)
    for s in t({"image": c["image"].copy(), "label": c["label"]}):
        assert set(torch.unique(s["label"]).tolist()) <= {0, 1}  # never the reference's -1
        outside = ~(s["image"] != 0).any(0)
        assert (s["image"][:, outside] == 0).all()
        # nested regions survive nearest-neighbour resampling
        assert (s["label"][0] <= s["label"][1]).all() and (s["label"][1] <= s["label"][2]).all()


# ------------------------------------------------------------------------------ the tail clip


def test_tail_clip_cuts_the_rare_bright_voxels():
    rng = np.random.default_rng(0)
    x = np.zeros((20, 20, 20), np.float32)
    x[2:18, 2:18, 2:18] = rng.integers(100, 200, size=(16, 16, 16))  # 4096 brain voxels, ~41 per unit
    x[5, 5, 5:15] = 5000  # ten very bright voxels (vessels): fewer than 50 in their bin
    clipped = clip_upper_tail(x)
    assert clipped.max() < 200 and clipped.max() >= 190  # clipped to the last bin holding >= 50 voxels
    assert (clipped[x < 190] == x[x < 190]).all()
    # normalisation: z-score after the clip; without it the outliers inflate the std
    a, b = normalize_image(x[None], "clip_zscore")[0], normalize_image(x[None], "zscore")[0]
    assert a[x > 0].std() == pytest.approx(1.0, abs=1e-3) and a[5, 5, 5] < 2 < b[5, 5, 5]
    assert (a[x == 0] == 0).all()


# ------------------------------------------------------------------------------ the election score


class _Fixed(torch.nn.Module):
    """Predicts fixed probabilities per modality (image channel m's voxel values, whatever the window)."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(spatial_dims=3, roi_size=(8, 8, 8), size_divisor=(1, 1, 1), name="fixed")
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, available):
        m = int(torch.as_tensor(available).float().argmax())  # singles only
        prob = x[:, m:m + 1].clamp(1e-6, 1 - 1e-6)
        return torch.logit(prob).expand(-1, 3, *x.shape[2:]), None


def test_reference_soft_score_and_hard_dice_elect_different_teachers():
    """Two cases. a: no tumour; T1 predicts 4 stray voxels (p 0.9), FLAIR nothing. b: a 4^3 tumour;
    FLAIR covers it exactly but unsurely (p 0.55), T1 surely (p 0.99) but misses a quarter of it.

    Hard Dice (threshold 0.5, empty vs empty = 1): FLAIR 1 and 1, T1 0 and 0.857 -> FLAIR.
    Reference soft Dice (probabilities, +1 in the denominator): an empty truth scores 0 for
    everyone; on b FLAIR 2·35.2/(35.2+64+1) = 0.703, T1 2·47.5/(47.5+64+1) = 0.845 -> T1."""
    empty = np.zeros((3, 8, 8, 8), np.uint8)
    truth = np.zeros((3, 8, 8, 8), np.uint8)
    truth[:, 2:6, 2:6, 2:6] = 1
    img_a = np.zeros((4, 8, 8, 8), np.float32)
    img_a[1, 0, 0, :4] = 0.9
    img_b = np.zeros((4, 8, 8, 8), np.float32)
    img_b[0] = truth[0] * 0.55
    img_b[1, 2:6, 2:6, 3:6] = 0.99
    cases = [{"name": "a", "image": img_a, "label": empty}, {"name": "b", "image": img_b, "label": truth}]
    kw = dict(crop_foreground=False, include_all=False)
    hard = elect_teachers(_Fixed(), cases, metric="hard", **kw)
    soft = elect_teachers(_Fixed(), cases, metric="soft", average="logits", **kw)
    et = REGIONS.index("ET")
    assert hard.scores[0, et] == pytest.approx(1.0) and hard.scores[1, et] == pytest.approx(0.857 / 2, abs=1e-3)
    assert soft.scores[0, et] == pytest.approx(0.703 / 2, abs=1e-3)
    assert soft.scores[1, et] == pytest.approx(0.845 / 2, abs=1e-3)
    assert (hard.winners["ET"], soft.winners["ET"]) == (0, 1)  # FLAIR by hard Dice, T1 by the reference's


# ------------------------------------------------------------------------------ the split


def test_paper_split_trains_on_every_case_and_elects_on_a_seeded_fifth():
    cases = [{"name": f"c{i:03d}", "image": None, "label": None} for i in range(285)]
    train_idx, val_idx = split_for(cases, P)
    assert len(train_idx) == 285 and len(val_idx) == 57 and set(val_idx) <= set(train_idx)
    assert split_for(cases, P) == (train_idx, val_idx)  # seeded
    import dataclasses

    held = dataclasses.replace(P, validation="holdout")
    tr, va = split_for(cases, held)
    assert len(tr) == 228 and set(tr).isdisjoint(va)
    named = dataclasses.replace(P, val_cases=("c001", "c007"))
    assert split_for(cases, named)[1] == [1, 7]
    with pytest.raises(ValueError, match="not among"):
        split_for(cases, dataclasses.replace(P, val_cases=("nope",)))


def test_reference_recipe_doc_has_the_augmentation_table():
    doc = (README.parent / "docs" / "reference_recipe.md").read_text()
    for name in ("RandZoomd", "Rand3DElasticd", "RandAffined", "RandGaussianNoised", "RandGaussianSmooth",
                 "RandScaleIntensityd", "RandShiftIntensity", "RandScaleIntensityFixedMeand",
                 "RandSimulateLowResolution", "RandAdjustContrastd", "RandFlipd"):
        assert re.search(rf"\b{name}\b", doc), name
