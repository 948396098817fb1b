"""The weights the kit ships (``checkpoints/lckd_small_phantom.pt``): safe to load, documented, and
its recorded evaluation reproducible from the files in the repository.

The checkpoint is made by ``experiment.train_shipped_checkpoint()`` (checkpoints/README.md); these
tests never retrain it. They regenerate the held-out phantoms (deterministic to the byte) in a
temporary cache and score the all-modality subset again, and they run ``lckd-kit evaluate`` on the
two bundled demo cases.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lckd_kit import ALL_PRESENT, MODALITIES, REGIONS, SUBSETS, cli, subset_name
from lckd_kit.evaluate import EvalResult, evaluate
from lckd_kit.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_model
from lckd_kit.train import train_config_from_dict
from lckd_kit.experiment import DEMO_N_TEST, heldout_phantoms, load_eval_cases
from lckd_kit.paths import data_samples_dir, shipped_checkpoint

SHIPPED_CHECKPOINT = shipped_checkpoint()
EVAL_JSON = SHIPPED_CHECKPOINT.with_name(SHIPPED_CHECKPOINT.stem + "_eval.json")
README = SHIPPED_CHECKPOINT.parent / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shipped():
    model, ckpt = load_model(SHIPPED_CHECKPOINT)
    return model, ckpt


def test_loads_safely_and_is_slim(shipped):
    assert SHIPPED_CHECKPOINT.stat().st_size < 5e6
    # load_checkpoint uses weights_only=True; the raw file must load that way too
    raw = torch.load(SHIPPED_CHECKPOINT, map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and "optimizer" not in raw
    model, ckpt = shipped
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in ckpt["model"].items()
                                                             if "weight" in k or "bias" in k)
    cfg = train_config_from_dict(ckpt["config"])
    assert cfg.no_kd is False and ckpt["step"] == cfg.total_steps  # LCKD, trained to the end
    assert len(ckpt["teachers"]) == len(MODALITIES) and any(ckpt["teachers"])
    assert ckpt["elections"] and all(len(e["scores"]) == 4 for e in ckpt["elections"])
    assert "train_shipped_checkpoint(" in ckpt["made_by"]["command"]


def test_readme_states_the_recorded_numbers():
    ev = EvalResult.from_json(EVAL_JSON)
    full = ev.dice_table()[SUBSETS.index(ALL_PRESENT)]
    text = README.read_text()
    assert "train_shipped_checkpoint(" in text
    line = next(l for l in text.splitlines() if l.startswith("All four modalities"))
    stated = dict(re.findall(r"\b(ET|TC|WT) (\d\.\d{3})\b", line))
    for region, value in zip(REGIONS, full):
        assert float(stated[region]) == pytest.approx(value, abs=5e-4)
    assert len(ev.cases) == DEMO_N_TEST and ev.dice_table().shape == (15, 3)


def test_recorded_all_modality_dice_is_reproduced(shipped, tmp_path):
    model, ckpt = shipped
    recorded = EvalResult.from_json(EVAL_JSON)
    test_dir = heldout_phantoms(DEMO_N_TEST, cache_dir=tmp_path, progress=False)
    cases = load_eval_cases(test_dir)
    assert [c["name"] for c in cases] == recorded.cases
    again = evaluate(model, cases, subsets=[ALL_PRESENT], device="cpu", hd95=False)
    want = recorded.per_case("dice")[:, SUBSETS.index(ALL_PRESENT)]  # (cases, 3)
    got = again.per_case("dice")[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    # and it is a model that learnt something: all-modality mean Dice well above chance
    assert np.nanmean(got) > 0.5


def test_cli_evaluate_on_the_bundled_demo_cases(tmp_path, capsys):
    out = tmp_path / "eval"
    rc = cli.main(["evaluate", "--data", str(data_samples_dir()), "--checkpoint", str(SHIPPED_CHECKPOINT),
                   "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = [ln for ln in printed.splitlines() if re.match(r"^\| [●○] \|", ln)]
    assert len(rows) == 15
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "results.csv", "results.json", "table.md"]
    res = EvalResult.from_json(out / "results.json")
    assert res.cases == ["PhantomBraTS_demo_000", "PhantomBraTS_demo_001"]
    dice = res.dice_table()
    assert dice.shape == (15, 3) and np.isfinite(dice).all() and ((0 <= dice) & (dice <= 1)).all()
    assert len(res.rows) == 2 * 15 * 3
    # the table is the paper's layout, and all four modalities beat T1 alone (the weakest single)
    full, t1 = SUBSETS.index(ALL_PRESENT), SUBSETS.index((False, True, False, False))
    assert dice[full].mean() > dice[t1].mean() + 0.2, (subset_name(SUBSETS[full]), dice[full], dice[t1])
