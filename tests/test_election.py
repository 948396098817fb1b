"""Tests for the inference core (evaluate.predict_subsets, Dice helpers) and teacher election.

Fast: tiny untrained LCKDNets on 32-voxel volumes, and a stub "model" whose segmentation can be
reasoned about exactly, so the election's choice is known in advance.
"""
from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, SUBSETS
from lckd_kit.election import SINGLES, ElectionResult, elect_teachers, winners_from_scores
from lckd_kit.inference import predict_subsets
from lckd_kit.metrics import hard_dice, soft_dice
from lckd_kit.model import CONFIGS, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(name: str, **kw):
    torch.manual_seed(0)
    cfg = replace(CONFIGS[name], **kw)
    return build_model(cfg).eval()


# ---------------------------------------------------------------------------------- Dice


def test_hard_dice_numbers():
    t = torch.zeros(3, 4, 4, 4, dtype=torch.bool)
    p = torch.zeros_like(t)
    t[0, :2] = True  # 32 voxels
    p[0, :1] = True  # 16 voxels, all inside: 2*16/(16+32) = 2/3
    t[1, 0, 0, 0] = True  # target only: 0
    # channel 2: both empty -> 1
    d = hard_dice(p, t)
    assert d.shape == (3,)
    assert d.tolist() == pytest.approx([2 / 3, 0.0, 1.0])
    # leading batch axes are kept
    assert hard_dice(p[None].expand(5, -1, -1, -1, -1), t[None]).shape == (5, 3)


def test_soft_dice_is_the_reference_formula():
    p = torch.full((3, 2, 2, 2), 0.5)
    t = torch.zeros(3, 2, 2, 2)
    t[:, 0] = 1  # 4 voxels per region
    # 2 * (0.5 * 4) / (0.5 * 8 + 4 + 1) = 4 / 9
    assert soft_dice(p, t).tolist() == pytest.approx([4 / 9] * 3)
    # +1 only in the denominator: an empty region with empty prediction scores 0, not 1
    assert soft_dice(torch.zeros(3, 2, 2, 2), torch.zeros(3, 2, 2, 2)).tolist() == [0.0, 0.0, 0.0]
    assert soft_dice(p[..., 0], t[..., 0], spatial_dims=2).shape == (3,)


# ---------------------------------------------------------------------------------- predict_subsets


def test_predict_subsets_equals_forward_3d():
    """One window covering the volume: every subset's probabilities equal a plain forward pass."""
    model = tiny_model("small", roi_size=(32, 16, 16))
    torch.manual_seed(1)
    image = torch.randn(4, 32, 16, 16)
    subsets = [SUBSETS[0], SUBSETS[5], ALL_PRESENT]
    prob = predict_subsets(model, image, subsets)
    assert prob.shape == (3, 3, 32, 16, 16) and prob.dtype == torch.float32
    with torch.no_grad():
        for i, s in enumerate(subsets):
            ref = torch.sigmoid(model(image[None], s)[0])[0]
            torch.testing.assert_close(prob[i], ref, atol=1e-5, rtol=1e-4)
    # with one window, averaging logits or probabilities is the same thing
    torch.testing.assert_close(predict_subsets(model, image.numpy(), subsets, average="logits"), prob,
                               atol=1e-5, rtol=1e-4)


def test_predict_subsets_2d_folds_slices_into_the_batch():
    model = tiny_model("small2d", roi_size=(32, 32))
    torch.manual_seed(2)
    image = torch.randn(4, 32, 32, 12)
    prob = predict_subsets(model, image, ["t1ce", ALL_PRESENT], roi_size=(32, 32, 8))
    assert prob.shape == (2, 3, 32, 32, 12)
    slices = image.permute(3, 0, 1, 2)  # (Z, 4, X, Y): each axial slice on its own
    with torch.no_grad():
        ref = torch.sigmoid(model(slices, ALL_PRESENT)[0]).permute(1, 2, 3, 0)  # (3, X, Y, Z)
    torch.testing.assert_close(prob[1], ref, atol=1e-5, rtol=1e-4)


class CountingModel(torch.nn.Module):
    """Wraps an LCKDNet and counts encode / decode calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.encodes = self.decodes = 0

    def encode(self, x):
        self.encodes += 1
        return self.inner.encode(x)

    def decode(self, enc, available):
        self.decodes += 1
        return self.inner.decode(enc, available)


def test_each_window_is_encoded_once():
    model = CountingModel(tiny_model("small", roi_size=(32, 16, 16)))
    image = torch.randn(4, 48, 16, 16)  # two windows along X with overlap 1/3
    prob = predict_subsets(model, image, SUBSETS)
    assert prob.shape == (15, 3, 48, 16, 16)
    assert model.encodes == 2
    assert model.decodes == 2 * 15
    assert 0.0 <= prob.min() and prob.max() <= 1.0


# ---------------------------------------------------------------------------------- election


class ThresholdModel(torch.nn.Module):
    """A stub segmenter that is only right when it sees the informative modality.

    ``decode`` predicts every region where the mean of the available channels exceeds 0.5
    (logits = 20 * (mean - 0.5)); "encoding" is the identity.
    """

    def __init__(self, roi=(16, 16, 16)):
        super().__init__()
        self.config = SimpleNamespace(spatial_dims=3, roi_size=roi, size_divisor=(1, 1, 1), name="stub")
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return x

    def decode(self, enc, available):
        m = torch.as_tensor(available, dtype=torch.bool, device=enc.device)
        mean = enc[:, m].mean(1, keepdim=True)
        return (20 * (mean - 0.5)).expand(-1, 3, *enc.shape[2:])


def informative_case(seed: int, informative: int = 2) -> dict:
    """Tumour (a cube, all three regions) visible only in channel ``informative``; others noise."""
    rng = np.random.default_rng(seed)
    label = np.zeros((3, 16, 16, 16), np.uint8)
    lo = rng.integers(2, 8, size=3)
    label[:, lo[0]:lo[0] + 6, lo[1]:lo[1] + 6, lo[2]:lo[2] + 6] = 1
    image = rng.uniform(0, 1, size=(4, 16, 16, 16)).astype(np.float32)  # noise: half the voxels > 0.5
    image[informative] = label[2] * 0.9 + 0.05
    return {"name": f"c{seed}", "image": image, "label": label}


@pytest.mark.parametrize("metric", ["hard", "soft"])
def test_election_picks_the_informative_modality(metric):
    cases = [informative_case(s) for s in range(3)]
    res = elect_teachers(ThresholdModel(), cases, metric=metric)
    assert res.scores.shape == (4, 3)
    assert res.winners == {"ET": 2, "TC": 2, "WT": 2}
    assert res.teachers == (False, False, True, False)
    assert res.teacher_names == ["t1ce"]
    best, others = res.scores[2], np.delete(res.scores, 2, axis=0)
    assert (best > others.max(0) + 0.3).all()
    if metric == "hard":
        assert best == pytest.approx([1.0, 1.0, 1.0])
        # the all-modality prediction averages t1ce with three noise channels: not perfect
        assert res.all_dice.shape == (3,) and (res.all_dice < 1.0).all()
    else:
        assert (best < 1.0).all() and (best > 0.9).all()  # soft Dice with +1 in the denominator


def test_election_on_a_real_model_structure_and_mode():
    model = tiny_model("small", roi_size=(32, 16, 16)).train()
    counting = CountingModel(model)
    counting.train()
    rng = np.random.default_rng(0)
    cases = [{"image": rng.normal(size=(4, 32, 16, 16)).astype(np.float32),
              "label": (rng.uniform(size=(3, 32, 16, 16)) > 0.7).astype(np.uint8)} for _ in range(2)]
    res = elect_teachers(counting, cases, step=7)
    assert counting.training and model.training  # mode restored
    assert counting.encodes == 2  # one window per case, encoded once
    assert counting.decodes == 2 * 5  # four singles + all
    assert res.scores.shape == (4, 3) and set(res.winners) == set(REGIONS)
    assert res.teachers == tuple(m in res.winners.values() for m in range(4))
    assert 1 <= sum(res.teachers) <= 3
    assert res.step == 7 and res.n_cases == 2
    rec = res.to_record()
    json.dumps(rec)  # JSON-able
    assert rec["kind"] == "election" and rec["step"] == 7
    assert set(rec["winners"]) == set(REGIONS) and all(v in MODALITIES for v in rec["winners"].values())
    assert rec["teachers"] == res.teacher_names and len(rec["scores"]) == 4
    back = ElectionResult.from_record(rec)
    assert back.winners == res.winners and back.teachers == res.teachers
    np.testing.assert_allclose(back.scores, res.scores, atol=1e-6)
    text = str(res)
    assert all(m in text for m in MODALITIES) and "teachers" in text

    model.eval()
    elect_teachers(model, cases[:1], include_all=False)
    assert not model.training


def test_winner_ties_go_to_the_lowest_index():
    scores = np.array([[0.5, 0.2, 0.7], [0.5, 0.9, 0.7], [0.1, 0.9, 0.7], [0.0, 0.0, 0.1]])
    winners, teachers = winners_from_scores(scores)
    assert winners == {"ET": 0, "TC": 1, "WT": 0}
    assert teachers == (True, True, False, False)


def test_election_rejects_bad_input():
    with pytest.raises(ValueError, match="metric"):
        elect_teachers(ThresholdModel(), [informative_case(0)], metric="dice")
    with pytest.raises(ValueError, match="at least one"):
        elect_teachers(ThresholdModel(), [])
    assert SINGLES == SUBSETS[:4]


def test_crop_foreground_runs_only_on_the_brain_box():
    """A pointwise stub: cropping must not change predictions inside the box, and gives 0 outside."""
    case = informative_case(0)
    image = torch.as_tensor(case["image"])
    image[:, :3] = 0  # "air" in front of the brain
    image[:, :, -2:] = 0
    full = predict_subsets(ThresholdModel(), image, SINGLES)
    crop = predict_subsets(ThresholdModel(), image, SINGLES, crop_foreground=True)
    torch.testing.assert_close(crop[:, :, 3:, :-2], full[:, :, 3:, :-2])
    assert crop[:, :, :3].abs().sum() == 0 and crop[:, :, :, -2:].abs().sum() == 0
    assert predict_subsets(ThresholdModel(), torch.zeros(4, 16, 16, 16), SINGLES, crop_foreground=True).abs().sum() == 0


def test_scoring_case_normalises_only_raw_cases():
    # like inference.model_input: a raw case is normalised as the model was trained; a case that says
    # it is already normalised (as_case(..., normalize=True)) is taken as it is
    from lckd_kit.data import as_case
    from lckd_kit.election import scoring_case
    from lckd_kit.transforms import normalize_image

    rng = np.random.default_rng(0)
    image = np.zeros((4, 12, 12, 12), np.float32)
    image[:, 2:10, 2:10, 2:10] = rng.gamma(2.0, 100.0, (4, 8, 8, 8))
    raw = {"name": "c", "image": image, "label": np.zeros((3, 12, 12, 12), np.uint8), "spacing": (2.0, 2.0, 2.0)}
    cfg = SimpleNamespace(spacing=(2.0, 2.0, 2.0), normalization="clip_zscore")
    np.testing.assert_allclose(scoring_case(raw, cfg)["image"], normalize_image(image, "clip_zscore"), atol=1e-6)
    np.testing.assert_array_equal(scoring_case({**raw, "normalized": True}, cfg)["image"], image)
    zscored = as_case(raw, normalize=True)
    np.testing.assert_array_equal(scoring_case(zscored, cfg)["image"], zscored["image"])
