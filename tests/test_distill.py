"""LCKD losses: distillation (reference "teach all", sum over pairs, teacher detached) and Dice+BCE."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from lckd_kit import SUBSETS
from lckd_kit import as_mask
from lckd_kit.distill import KD_WEIGHT, distillation_loss, segmentation_loss


# features (B=1, 4 modalities, C=1, 2 voxels): flair (0, 0), t1 (1, 2), t1ce (3, 1), t2 (-1, 4)
TINY = torch.tensor([[[[0.0, 0.0]], [[1.0, 2.0]], [[3.0, 1.0]], [[-1.0, 4.0]]]])
ALL = (True, True, True, True)
T1CE = (False, False, True, False)


def reference_kd(features, avail_ids, teacher_ids):
    """LCKD_SPEC section 3 / 9.1, literally."""
    kd = torch.zeros(())
    for t in teacher_ids:
        if t in avail_ids:
            for s in range(4):
                if s in avail_ids:
                    kd = kd + F.l1_loss(features[:, s], features[:, t].detach())
    return kd


@pytest.mark.parametrize("kwargs,expected", [
    # teacher t1ce vs flair: (3+1)/2 = 2; t1: (2+1)/2 = 1.5; itself 0; t2: (4+3)/2 = 3.5
    (dict(), 7.0),
    (dict(reduction="mean"), 7.0 / 4),  # 4 pairs, the self pair included
    (dict(pairs="students"), 7.0),
    (dict(pairs="students", reduction="mean"), 7.0 / 3),
    # squared: (9+1)/2 = 5, (4+1)/2 = 2.5, 0, (16+9)/2 = 12.5
    (dict(distance="mse"), 20.0),
])
def test_hand_computed_single_teacher(kwargs, expected):
    assert distillation_loss(TINY, ALL, T1CE, **kwargs).item() == pytest.approx(expected)


def test_hand_computed_two_teachers_one_missing_modality():
    avail, teachers = (True, True, True, False), (True, False, True, False)
    # t=flair: t1 1.5, t1ce 2; t=t1ce: flair 2, t1 1.5 (t2 missing, self pairs 0)
    assert distillation_loss(TINY, avail, teachers).item() == pytest.approx(7.0)
    assert distillation_loss(TINY, avail, teachers, reduction="mean").item() == pytest.approx(7.0 / 6)
    assert distillation_loss(TINY, avail, teachers, pairs="students").item() == pytest.approx(3.0)
    assert distillation_loss(TINY, avail, teachers, pairs="students", reduction="mean").item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="bool mask"):  # indices are not a mask: as_mask makes one
        distillation_loss(TINY, avail, [0, 2])
    assert distillation_loss(TINY, avail, as_mask([0, 2])).item() == pytest.approx(7.0)


def test_matches_reference_formula_random():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 8, 2, 2, 2, generator=g)
    for avail, teachers in itertools.product(SUBSETS[::2], [(True, False, True, False), (False, True, False, False),
                                                            (True, True, True, True)]):
        ids = [m for m in range(4) if avail[m]]
        tids = [m for m in range(4) if teachers[m]]
        torch.testing.assert_close(distillation_loss(feats, avail, teachers), reference_kd(feats, ids, tids))
        torch.testing.assert_close(distillation_loss(feats, torch.tensor([avail, avail]), torch.tensor(teachers)),
                                   reference_kd(feats, ids, tids))


def test_zero_without_available_teacher():
    feats = torch.randn(2, 4, 3, 2, 2, requires_grad=True)
    none = distillation_loss(feats, ALL, (False,) * 4)
    assert none.item() == 0.0 and none.dim() == 0 and none.device == feats.device
    missing = distillation_loss(feats, (True, True, False, False), (False, False, True, True))
    assert missing.item() == 0.0
    (feats.square().mean() + KD_WEIGHT * (none + missing)).backward()  # safe to add to a loss
    torch.testing.assert_close(feats.grad, 2 * feats.detach() / feats.numel())


def test_teacher_side_is_detached():
    feats = torch.randn(2, 4, 3, 2, 2, requires_grad=True)
    distillation_loss(feats, ALL, T1CE).backward()
    assert float(feats.grad[:, 2].abs().max()) == 0.0  # teacher: only its own (zero) self pair
    assert float(feats.grad[:, 0].abs().max()) > 0.0

    # two teachers: flair's gradient comes only from the pair (t1ce -> flair), as a student
    feats.grad = None
    distillation_loss(feats, ALL, (True, False, True, False)).backward()
    f = feats.detach().clone().requires_grad_(True)
    F.l1_loss(f[:, 0], f[:, 2].detach()).backward()
    torch.testing.assert_close(feats.grad[:, 0], f.grad[:, 0])


def test_per_sample_availability():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 4, 5, 2, 2, generator=g)
    rows = [(True, True, True, True), (False, True, True, False), (True, False, False, True)]
    teachers = (False, False, True, True)
    expected = 0.0
    for t, s in itertools.product(range(4), range(4)):
        if not teachers[t]:
            continue
        both = [b for b in range(3) if rows[b][t] and rows[b][s]]
        if both:  # the mean over the samples that have both modalities
            expected += sum(float((feats[b, s] - feats[b, t]).abs().mean()) for b in both) / len(both)
    assert distillation_loss(feats, rows, teachers).item() == pytest.approx(expected, rel=1e-6)
    # identical rows reduce to the shared-subset (reference) value
    same = distillation_loss(feats, [SUBSETS[11]] * 3, teachers)
    torch.testing.assert_close(same, distillation_loss(feats, SUBSETS[11], teachers))


def test_bad_arguments():
    with pytest.raises(ValueError):
        distillation_loss(TINY, ALL, T1CE, distance="cosine")
    with pytest.raises(ValueError):
        distillation_loss(TINY, ALL, T1CE, pairs="some")
    with pytest.raises(ValueError):
        distillation_loss(TINY, ALL, T1CE, reduction="max")
    with pytest.raises(ValueError):
        distillation_loss(TINY, (True, True, True), T1CE)


def hand_segmentation_loss(logits, target):
    p, t = torch.sigmoid(logits.double()), target.double()
    dims = tuple(range(2, logits.dim()))
    dice = 1 - 2 * (p * t).sum(dims) / (p.sum(dims) + t.sum(dims) + 1)  # (B, 3)
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))  # (B, 3, *S)
    per_channel = bce.transpose(0, 1).reshape(3, -1).mean(1)
    return dice.mean(), per_channel.sum()


@pytest.mark.parametrize("spatial", [(6, 5, 4), (7, 9)])
def test_segmentation_loss_matches_hand_formula(spatial):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, *spatial, generator=g) * 2
    target = (torch.rand(2, 3, *spatial, generator=g) > 0.7).to(torch.uint8)
    target[1, 0] = 0  # an empty channel
    total, dice, bce = segmentation_loss(logits, target)
    hand_dice, hand_bce = hand_segmentation_loss(logits, target)
    assert dice.item() == pytest.approx(hand_dice.item(), rel=1e-5)
    assert bce.item() == pytest.approx(hand_bce.item(), rel=1e-5)
    assert total.item() == pytest.approx(hand_dice.item() + hand_bce.item(), rel=1e-5)
    # BCE is summed over the 3 channels: 3x the plain mean
    assert bce.item() == pytest.approx(3 * F.binary_cross_entropy_with_logits(logits, target.float()).item(), rel=1e-5)


def test_segmentation_loss_gradient():
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    total, _, _ = segmentation_loss(logits, target)
    total.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().max()) > 0
