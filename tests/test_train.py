"""Tests for the two-stage training loop: runs, determinism/resume, checkpoints, schedule, sampling.

All runs use 32^3 phantoms (6 mm voxels) and the seconds-long "tiny" config.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch

from lckd_kit import ALL_PRESENT, REGIONS, SUBSETS, phantom
from lckd_kit.model import CONFIGS, config_to_dict
from lckd_kit.batches import StepBatches, make_batch, sample_subset, split_cases, training_cases
from lckd_kit.checkpoint import checksum, load_checkpoint, load_model, read_history
from lckd_kit.train import (
    TRAIN_CONFIGS,
    TrainConfig,
    get_train_config,
    lr_at,
    model_config_for,
    train,
    train_config_from_dict,
    train_config_to_dict,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cases():
    return [phantom.make_case(s, grid=32) for s in range(4)]


def tiny(**kw) -> TrainConfig:
    return get_train_config("tiny", **kw)


def kinds(history):
    return Counter(r["kind"] for r in history)


def params_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------- runs


def test_short_run_2d_writes_a_run_folder(cases, tmp_path):
    seen = []
    res = train("tiny", cases, out_dir=tmp_path, progress=False, callback=lambda s, r: seen.append((s, r["kind"])))
    cfg = TRAIN_CONFIGS["tiny"]
    assert res.step == cfg.total_steps == 8
    assert kinds(res.history) == {"step": 8, "election": 2, "features": 2, "val": 2}
    assert seen == [(r["step"], r["kind"]) for r in res.history]
    # the mechanism records: 4x4 feature distances (0 on the diagonal) and 4 fill-in errors
    feats = [r for r in res.history if r["kind"] == "features"]
    assert [f["step"] for f in feats] == [4, 8] and all(f["n_cases"] == 1 for f in feats)
    l1 = np.array(feats[0]["l1"])
    assert l1.shape == (4, 4) and np.allclose(np.diag(l1), 0) and np.allclose(l1, l1.T) and (l1 > 0).sum() == 12
    assert len(feats[0]["fill_error"]) == 4 and all(e > 0 for e in feats[0]["fill_error"])
    assert read_history(tmp_path) == res.history
    steps = [r for r in res.history if r["kind"] == "step"]
    assert [r["stage"] for r in steps] == [1] * 4 + [2] * 4
    assert all(r["subset"] == "flair+t1+t1ce+t2" for r in steps[:4])
    assert all(r["subset"] != "flair+t1+t1ce+t2" for r in steps[4:])
    assert all(np.isfinite(r["loss"]) for r in steps)
    assert steps[0]["teachers"] == ["flair"]  # the reference's initial teacher, no election at step 0
    val = [r for r in res.history if r["kind"] == "val"]
    assert [v["step"] for v in val] == [4, 8] and set(val[0]["dice"]) == set(REGIONS)
    for name in ("config.json", "history.jsonl", "last.pt", "final.pt"):
        assert (tmp_path / name).is_file()
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["model_config"]["name"] == "small2d"
    assert set(stored["split"]["val"]).isdisjoint(stored["split"]["train"])
    assert res.split == stored["split"]
    assert len(res.elections) == 2 and res.teachers == res.elections[-1].teachers
    assert not res.model.training


def test_short_run_3d_from_a_folder(tmp_path):
    phantom.generate(tmp_path / "data", n=3, seed=0, grid=32, progress=False)
    cfg = tiny(model="small", roi_size=(32, 32, 32), batch_size=2, crops_per_case=1,
               stage1_steps=2, stage2_steps=2, elect_every=2)
    res = train(cfg, tmp_path / "data", out_dir=None, progress=False)
    assert res.step == 4 and res.out_dir is None
    assert kinds(res.history) == {"step": 4, "election": 2, "features": 2, "val": 2}
    assert res.split["val"] and set(res.split["val"]).isdisjoint(res.split["train"])


def test_loss_decreases(cases):
    cfg = tiny(stage1_steps=24, stage2_steps=0, elect_every=1000, elect_at_end=False, log_every=1)
    res = train(cfg, cases, progress=False)
    losses = [r["loss"] for r in res.history if r["kind"] == "step"]
    assert len(losses) == 24
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_no_kd_records_zero_distillation(cases):
    base = dict(stage1_steps=2, stage2_steps=2, elect_every=100, elect_at_end=False)
    kd = train(tiny(**base), cases, progress=False).history
    nokd = train(tiny(no_kd=True, **base), cases, progress=False).history
    assert all(r["kd"] == 0.0 for r in nokd if r["kind"] == "step")
    # stage 1 has all four modalities and FLAIR as teacher: KD is active in the LCKD run
    assert all(r["kd"] > 0 for r in kd if r["kind"] == "step" and r["stage"] == 1)
    # same batches, same initial weights: the first step's segmentation loss is identical
    assert kd[0]["dice_loss"] == nokd[0]["dice_loss"] and kd[0]["bce"] == nokd[0]["bce"]


def test_reference_options_run(cases):
    """The reference's quirks, as options: election at step 0 on training cases with soft Dice,
    teachers reset to FLAIR at stage 2; plus the restart schedule and per-sample subsets."""
    cfg = tiny(elect_at_start=True, elect_on="train", elect_metric="soft", stage2_reset_teachers=True,
               stage2_schedule="restart", stage2_reset_momentum=True, stage2_sampling="sample",
               stage1_steps=2, stage2_steps=2, elect_every=100, optimizer="adamw", lr=1e-3)
    res = train(cfg, cases, progress=False)
    hist = res.history
    assert hist[0]["kind"] == "election" and hist[0]["step"] == 0 and hist[0]["metric"] == "soft"
    assert [r["kind"] for r in hist[1:3]] == ["features", "val"] and hist[2]["step"] == 0
    stage2 = [r for r in hist if r["kind"] == "step" and r["stage"] == 2]
    assert all(r["teachers"] == ["flair"] for r in stage2) and all(r["subset"] == "per-sample" for r in stage2)
    assert stage2[0]["lr"] == pytest.approx(1e-3)  # restarted poly
    assert kinds(hist) == {"step": 4, "election": 2, "features": 2, "val": 2}


# ---------------------------------------------------------------------------------- determinism


def test_batches_are_pure_functions_of_the_step(cases):
    cfg = tiny(stage2_sampling="sample")
    src = StepBatches(training_cases(cases), cfg, spatial_dims=2, steps=[])
    a, b, c = make_batch(5, src, cfg), make_batch(5, src, cfg), make_batch(6, src, cfg)
    assert a["image"].shape == (4, 4, 32, 32) and a["label"].shape == (4, 3, 32, 32)
    assert type(a["image"]) is torch.Tensor  # not a MONAI MetaTensor
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert torch.equal(a["available"], b["available"])
    assert not torch.equal(a["image"], c["image"])
    assert a["available"].shape == (4, 4) and not a["available"].all(1).any()  # per sample, never all
    s1 = make_batch(0, src, cfg)
    assert s1["available"].tolist() == list(ALL_PRESENT)


@pytest.mark.parametrize("sampling", ["batch", "sample"])
def test_rank_slices_of_a_step_make_up_the_single_process_batch(cases, sampling):
    """DDP seam: the two ranks' batches of a step, stacked, are the one-process batch of twice the size."""
    cfg = tiny(stage2_sampling=sampling)
    src = StepBatches(training_cases(cases), cfg, spatial_dims=2, steps=[])
    big = dataclasses.replace(cfg, batch_size=2 * cfg.batch_size)
    src_big = StepBatches(training_cases(cases), big, spatial_dims=2, steps=[])
    for step in (1, 6):  # stage 1 and stage 2
        ranks = [make_batch(step, src, cfg, rank=r, world_size=2) for r in range(2)]
        whole = make_batch(step, src_big, big)
        assert torch.equal(torch.cat([b["image"] for b in ranks]), whole["image"])
        assert torch.equal(torch.cat([b["label"] for b in ranks]), whole["label"])
        assert not torch.equal(ranks[0]["image"], ranks[1]["image"])
        if sampling == "batch" or step < cfg.stage1_steps:
            assert torch.equal(ranks[0]["available"], whole["available"])
            assert torch.equal(ranks[1]["available"], whole["available"])
        else:
            assert torch.equal(torch.cat([b["available"] for b in ranks]), whole["available"])


def test_resume_is_bit_identical_across_the_stage_boundary(cases, tmp_path):
    full = train("tiny", cases, out_dir=tmp_path / "full", progress=False)
    # interrupted in stage 1 (after 3 of 4 warm-up steps), resumed, finished through stage 2
    part = train("tiny", cases, out_dir=tmp_path / "cut", progress=False, max_steps=3)
    assert part.step == 3 and load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3
    assert not (tmp_path / "cut" / "final.pt").exists()
    resumed = train("tiny", cases, out_dir=tmp_path / "cut", progress=False, resume=True)
    assert params_equal(full.model, resumed.model)
    assert resumed.history == full.history  # history continued, nothing duplicated
    assert read_history(tmp_path / "cut") == full.history
    assert resumed.teachers == full.teachers


@pytest.mark.parametrize("stop_at, saved", [(7, 7), (8, 6)])
def test_interrupt_in_stage_2_saves_a_consistent_checkpoint(cases, tmp_path, stop_at, saved):
    """Ctrl-C / a notebook's stop button: the state after the last complete step is saved, unless
    that step still owes an election (step 8 of tiny), then the last regular checkpoint is used."""
    full = train("tiny", cases, out_dir=tmp_path / "full", progress=False)

    def stop(step, record):
        if step == stop_at and record["kind"] == "step":
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="interrupted") if stop_at == saved else _no_warning():
        with pytest.raises(KeyboardInterrupt):
            train("tiny", cases, out_dir=tmp_path / "cut", progress=False, callback=stop)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == saved
    resumed = train("tiny", cases, out_dir=tmp_path / "cut", progress=False, resume=True)
    assert params_equal(full.model, resumed.model)
    assert read_history(tmp_path / "cut") == full.history


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------- checkpoints


def test_checkpoint_is_plain_and_rebuilds_the_model(cases, tmp_path):
    res = train(tiny(stage1_steps=2, stage2_steps=0, elect_every=100), cases, out_dir=tmp_path, progress=False)
    raw = torch.load(tmp_path / "final.pt", weights_only=True)  # no pickled objects
    assert raw["format"] == "lckd_kit/2" and raw["step"] == 2
    assert set(raw) >= {"model", "optimizer", "scaler", "step", "config", "teachers", "elections", "checksum",
                        "kit_version"}
    assert raw["checksum"] == checksum(raw) and raw["checksum"].startswith("sha256:")
    assert raw["config"]["model_config"] == config_to_dict(model_config_for(res.config, (6.0, 6.0, 6.0)))
    # the model's input contract: tiny's crop as its window, the 32^3 phantoms' 6 mm voxels
    assert raw["config"]["model_config"]["roi_size"] == [32, 32]
    assert raw["config"]["model_config"]["spacing"] == [6.0, 6.0, 6.0]
    assert train_config_from_dict(raw["config"]) == res.config
    assert len(raw["teachers"]) == 4 and all(isinstance(t, bool) for t in raw["teachers"])
    model, ckpt = load_model(tmp_path / "final.pt")
    assert params_equal(model, res.model) and not model.training


def test_resume_with_another_model_config_is_refused(cases, tmp_path):
    train(tiny(), cases, out_dir=tmp_path, progress=False, max_steps=2)
    other = dataclasses.replace(CONFIGS["small2d"], name="narrow", stem_width=8)
    with pytest.raises(ValueError, match=r"last\.pt.*model config") as err:
        train(tiny(model=config_to_dict(other)), cases, out_dir=tmp_path, progress=False, resume=True)
    assert "narrow" in str(err.value) and "small2d" in str(err.value)


def test_config_dict_round_trip():
    for cfg in TRAIN_CONFIGS.values():
        d = train_config_to_dict(cfg)
        json.dumps(d)
        assert train_config_from_dict(d) == cfg
    with pytest.raises(ValueError, match="stage2_schedule"):
        train(tiny(stage2_schedule="cosine"), [], progress=False)


# ---------------------------------------------------------------------------------- schedule, sampling, split


def test_lr_schedule_continue_and_restart():
    cont = TrainConfig(stage1_steps=80, stage2_steps=35, stage2_schedule="continue")
    rest = dataclasses.replace(cont, stage2_schedule="restart")
    assert lr_at(0, cont) == lr_at(0, rest) == pytest.approx(1e-2)
    assert lr_at(79, cont) == lr_at(79, rest) == pytest.approx(1e-2 * (1 / 80) ** 0.9)
    # reference: the counter continues under the total length, so the lr jumps back up
    assert lr_at(80, cont) == pytest.approx(1e-2 * (1 - 80 / 115) ** 0.9)
    assert lr_at(80, rest) == pytest.approx(1e-2)
    assert lr_at(114, rest) == pytest.approx(1e-2 * (1 / 35) ** 0.9)
    for cfg in (cont, rest):
        s1 = [lr_at(s, cfg) for s in range(80)]
        s2 = [lr_at(s, cfg) for s in range(80, 115)]
        assert all(np.diff(s1) < 0) and all(np.diff(s2) < 0) and s2[0] > s1[-1]


def test_stage2_sampling_follows_the_reference_distribution():
    rng = np.random.default_rng(0)
    n = 20000
    counts = Counter(sample_subset(rng) for _ in range(n))
    assert ALL_PRESENT not in counts
    assert set(counts) == set(SUBSETS[:14])  # every other subset occurs
    for mask, c in counts.items():
        expected = {1: 1 / 12, 2: 1 / 18, 3: 1 / 12}[sum(mask)]
        assert abs(c / n - expected) < 0.01, (mask, c / n)


def test_split_is_deterministic_and_disjoint():
    tr, va = split_cases(20, 5, seed=3)
    assert (tr, va) == split_cases(20, 5, seed=3)
    assert len(va) == 5 and set(tr).isdisjoint(va) and sorted(tr + va) == list(range(20))
    assert split_cases(20, 5, seed=4) != (tr, va)
    assert len(split_cases(20, 0, seed=3)[1]) == 1  # at least one validation case
    assert split_cases(1, 1, seed=3) == ([0], [0])  # a single case is used for both


def test_cpu_configs_say_how_they_differ_from_the_paper_recipe():
    """The paper recipe is pinned field by field in test_reference_recipe.py; the CPU teaching
    configs deliberately use AdamW and keep the rest of the reference's loss and schedule."""
    p = TRAIN_CONFIGS["paper"]
    for name in ("small", "small2d"):
        c = TRAIN_CONFIGS[name]
        assert (c.optimizer, c.lr, c.weight_decay) == ("adamw", 3e-3, 0.0)
        assert (c.kd_weight, c.kd_distance, c.stage2_schedule, c.stage2_sampling) == (0.1, "l1", "continue", "batch")
    # the schedule's reference lr jump at the stage boundary (3.9e-7 -> 3.4e-3 in the paper recipe)
    assert lr_at(79_999, p) == pytest.approx(1e-2 * (1 / 80_000) ** 0.9)
    assert lr_at(80_000, p) == pytest.approx(1e-2 * (35_000 / 115_000) ** 0.9, rel=1e-6)


def test_case_cache_keeps_to_its_budget_and_freezes_before_workers(cases):
    from lckd_kit.batches import _nbytes

    one_case_mb = _nbytes(StepBatches(cases, tiny(), 2).prepared(0)) / 2**20  # the 32^3 phantoms are alike in size
    source = StepBatches(cases, tiny(cache_mb=2.5 * one_case_mb), 2)
    assert source.fill_cache() == 2  # filling stops once the budget is spent
    assert source._cache_bytes <= 2.5 * one_case_mb * 2**20 and set(source._cache) == {1, 2}
    source.prepared(3)  # LRU: case 3 in, the least recently used out
    assert set(source._cache) == {2, 3}
    source.freeze()
    held = dict(source._cache)
    again = source.prepared(0)  # outside the frozen cache: prepared for one use, not kept
    assert 0 not in source._cache and set(source._cache) == set(held)
    assert np.array_equal(np.asarray(again["image"]), np.asarray(source.prepared(0)["image"]))  # deterministic prefix
