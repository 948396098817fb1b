"""Tests for the other missing-modality methods (lckd_kit.methods) and their one interface.

Each method's key mechanism is pinned here with numbers: HeMIS never reads (or encodes) a missing
modality and its variance is 0 with one modality; the region-fusion weights are a softmax over the
available modalities only; dropout's first layer sees exact zeros in the missing channels. Then the
interface: the registry, config dicts in checkpoints, and a model written in this file trained and
evaluated by the kit's own loop and evaluation. Tiny inputs, 32^3 phantoms, the "tiny" schedule.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn

from lckd_kit import ALL_PRESENT, MODALITIES, SUBSETS, methods, phantom
from lckd_kit.checkpoint import load_model
from lckd_kit.evaluate import evaluate
from lckd_kit.inference import per_subset_reference, predict_subsets
from lckd_kit.model import LCKDNet, ModelConfig, parameter_count
from lckd_kit.train import TRAIN_CONFIGS, get_train_config, model_config_for, train

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ("dropout", "hemis", "regionfusion")
SHAPES = {"small2d": (32, 32), "small": (32, 32, 32)}  # the smallest inputs the stride-16 nets take


def net(method: str, size: str = "small2d", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return methods.build(methods.config_name_for(method, size)).eval()


def images(size: str = "small2d", batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *SHAPES[size], generator=g)


@pytest.fixture(scope="module")
def cases():
    return [phantom.make_case(s, grid=32) for s in range(4)]


# ---------------------------------------------------------------------------------- sizes and shapes


@pytest.mark.parametrize("size", ["small2d", "small"])
def test_parameter_counts_match_lckd_at_the_same_size(size):
    counts = methods.parameter_table(size)
    assert set(counts) == {"lckd", *NEW}
    ref = counts["lckd"]
    assert ref == {"small2d": 491_648, "small": 921_312}[size]
    for m in NEW:  # a fair comparison on a CPU: within 5 % of LCKD's parameters
        assert 0.95 * ref <= counts[m] <= 1.05 * ref, (m, counts[m], ref)


@pytest.mark.parametrize("size", ["small2d", "small"])
@pytest.mark.parametrize("method", NEW)
def test_shapes_and_no_features(method, size):
    model = net(method, size)
    cfg = model.config
    assert cfg.method == method and cfg.spatial_dims == len(SHAPES[size])
    assert cfg.size_divisor == (16,) * cfg.spatial_dims  # the same stride as LCKD's small configs
    x = images(size)
    with torch.no_grad():
        logits, feats = model(x, torch.tensor([True, False, True, False]))
    assert logits.shape == (2, 3, *SHAPES[size]) and feats is None
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="divisible"):
        model(images(size)[..., :24], torch.tensor(ALL_PRESENT))
    with pytest.raises(ValueError, match="no available modality"):
        model(x, torch.tensor([[True] * 4, [False] * 4]))


@pytest.mark.parametrize("method", ["lckd", *NEW])
def test_missing_channel_content_never_changes_the_output(method):
    """For every subset (shared and per sample), garbage -- even NaN -- in the missing channels
    gives the bit-identical output."""
    model = net(method)
    x = images()
    per_sample = torch.tensor([[True, False, False, True], [False, True, True, False]])
    with torch.no_grad():
        for mask in [torch.tensor(s) for s in SUBSETS] + [per_sample]:
            full = mask.expand(2, 4)
            garbage = x.clone()
            garbage[~full] = torch.randn_like(garbage[~full]) * 100
            nan = x.clone()
            nan[~full] = float("nan")
            a = model(x, mask)[0]
            assert torch.equal(a, model(garbage, mask)[0]), (method, mask.tolist())
            assert torch.equal(a, model(nan, mask)[0]), (method, mask.tolist())


# ---------------------------------------------------------------------------------- HeMIS


def test_hemis_does_not_run_a_missing_modalitys_encoder():
    model = net("hemis")
    seen = {m: [] for m in range(4)}
    hooks = [enc.register_forward_pre_hook(lambda mod, inp, m=m: seen[m].append(inp[0].shape[0]))
             for m, enc in enumerate(model.encoders)]
    try:
        with torch.no_grad():
            model(images(batch=3), torch.tensor([True, False, True, False]))
            assert {m: len(v) for m, v in seen.items()} == {0: 1, 1: 0, 2: 1, 3: 0}
            for v in seen.values():
                v.clear()
            # per-sample subsets: each encoder runs on exactly the samples that have its modality
            model(images(batch=3), torch.tensor([[True, False, False, False], [True, True, False, False],
                                                  [False, True, False, False]]))
            assert seen == {0: [2], 1: [2], 2: [], 3: []}
    finally:
        for h in hooks:
            h.remove()


def test_hemis_missing_encoders_get_no_gradient():
    model = net("hemis").train()
    logits, _ = model(images(), torch.tensor([False, True, False, False]))
    logits.square().mean().backward()
    for m, enc in enumerate(model.encoders):
        grads = [p.grad for p in enc.parameters()]
        if m == 1:
            assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
        else:
            assert all(g is None for g in grads)


def test_hemis_moments_are_mean_and_population_variance():
    model = net("hemis")
    x = images()
    widths = model.config.widths
    with torch.no_grad():
        for m in range(4):  # one modality: the mean is its feature, the variance exactly 0
            mask = torch.tensor([i == m for i in range(4)])
            own = model.encoders[m](x[:, m:m + 1])
            for level, fused in enumerate(model.moments(x, mask)):
                c = widths[level]
                assert fused.shape[1] == 2 * c
                assert torch.equal(fused[:, c:], torch.zeros_like(fused[:, c:]))
                assert torch.allclose(fused[:, :c], own[level], atol=1e-6)
        # two modalities: mean (a+b)/2 and variance ((a-b)/2)^2 per voxel and channel
        a, b = model.encoders[0](x[:, :1]), model.encoders[3](x[:, 3:])
        fused = model.moments(x, torch.tensor([True, False, False, True]))
        for level, f in enumerate(fused):
            c = widths[level]
            assert torch.allclose(f[:, :c], (a[level] + b[level]) / 2, atol=1e-5)
            assert torch.allclose(f[:, c:], ((a[level] - b[level]) / 2).square(), atol=1e-5)
            assert (f[:, c:] > 0).float().mean() > 0.9  # genuinely non-zero with two modalities


# ---------------------------------------------------------------------------------- region fusion


def test_region_weights_are_a_softmax_over_the_available_modalities():
    model = net("regionfusion")
    x = images(batch=2)
    with torch.no_grad():
        for s in SUBSETS:
            mask = torch.tensor(s)
            for w in model.region_weights(x, mask):  # one (B, 4, 3) per level
                assert w.shape == (2, 4, 3)
                assert torch.allclose(w.sum(1), torch.ones(2, 3), atol=1e-6)
                assert torch.equal(w[:, ~mask], torch.zeros_like(w[:, ~mask]))
                assert (w[:, mask] > 0).all()
                if sum(s) == 1:
                    assert torch.equal(w[:, mask], torch.ones_like(w[:, mask]))
        # per-sample subsets, and the weights differ between regions (they are per region)
        per_sample = torch.tensor([[True, True, False, True], [False, False, True, True]])
        ws = model.region_weights(x, per_sample)
        for w in ws:
            assert torch.equal(w[0, 2], torch.zeros(3)) and torch.equal(w[1, :2], torch.zeros(2, 3))
            assert torch.allclose(w.sum(1), torch.ones(2, 3), atol=1e-6)
        assert max(float((w[..., 0] - w[..., 2]).abs().max()) for w in ws) > 1e-4


def test_region_weights_follow_the_features():
    """The weights are predicted from the data: other images, other weights."""
    model = net("regionfusion")
    with torch.no_grad():
        w1 = model.region_weights(images(seed=1), torch.tensor(ALL_PRESENT))
        w2 = model.region_weights(images(seed=2) * 3, torch.tensor(ALL_PRESENT))
    assert max(float((a - b).abs().max()) for a, b in zip(w1, w2)) > 1e-4


# ---------------------------------------------------------------------------------- dropout


def test_dropout_first_layer_sees_zeros_exactly_in_the_missing_channels():
    model = net("dropout")
    first = model.encoder.levels[0].conv1
    seen = []
    hook = first.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].clone()))
    x = images(batch=2)
    x[:, 1] = float("nan")  # T1 is missing below: whatever it holds, the net sees 0
    x[:, 3] = 7.0
    try:
        with torch.no_grad():
            model(x, torch.tensor([True, False, True, False]))
            model(x.nan_to_num(), torch.tensor([[True, True, False, False], [False, False, False, True]]))
    finally:
        hook.remove()
    assert seen[0].shape == (2, 4, 32, 32)
    assert torch.equal(seen[0][:, [1, 3]], torch.zeros(2, 2, 32, 32))
    assert torch.equal(seen[0][:, [0, 2]], x[:, [0, 2]])
    y = x.nan_to_num()
    assert torch.equal(seen[1][0, 2:], torch.zeros(2, 32, 32)) and torch.equal(seen[1][0, :2], y[0, :2])
    assert torch.equal(seen[1][1, :3], torch.zeros(3, 32, 32)) and torch.equal(seen[1][1, 3], y[1, 3])
    assert model.encoder.levels[0].conv1.conv.in_channels == 4  # one net on the 4-channel input


# ---------------------------------------------------------------------------------- inference paths


@pytest.mark.parametrize("method", ["hemis", "regionfusion"])
def test_encode_once_decode_every_subset_equals_forward(method):
    model = net(method)
    x = images()
    with torch.no_grad():
        enc = model.encode(x)
        assert enc.bottleneck.shape[:2] == (2, 4)
        for s in SUBSETS:
            assert torch.allclose(model.decode(enc, torch.tensor(s)), model(x, torch.tensor(s))[0], atol=1e-5)


@pytest.mark.parametrize("method", NEW)
def test_sliding_window_inference_matches_the_per_subset_path(method, cases):
    """inference.predict_subsets (encode once when the model can) == one forward per subset."""
    model = net(method)
    model.config = dataclasses.replace(model.config, roi_size=(32, 32))
    image = torch.as_tensor(cases[0]["image"], dtype=torch.float32)
    image = (image - image.mean()) / image.std()
    subsets = [SUBSETS[0], SUBSETS[5], ALL_PRESENT]
    fast = predict_subsets(model, image, subsets)
    slow = per_subset_reference(model, image, subsets)
    assert fast.shape == (3, 3, 32, 32, 32)
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("method", NEW)
def test_the_explorer_shows_any_method(method, cases):
    from lckd_kit.widgets import ExplorerState

    model = net(method)
    model.config = dataclasses.replace(model.config, roi_size=(32, 32))
    st = ExplorerState.from_case(model, cases[0])
    table = st.all_subset_dice()
    assert table.shape == (15, 3) and np.isfinite(table).all()
    assert st.probabilities("flair+t1ce").shape == (3, 32, 32, 32)
    ev = evaluate(model, cases[:1], hd95=False)  # the explorer shows the evaluation's numbers
    assert np.allclose(ev.per_case("dice")[0], table, atol=1e-6)


# ---------------------------------------------------------------------------------- the interface


def test_registry_knows_every_method_and_config():
    assert set(methods.METHODS) <= set(methods.REGISTRY)
    named = methods.model_configs()
    for size in ("small2d", "small"):
        assert isinstance(named[size], ModelConfig)  # LCKD's configs are registered under their own names
        for m in NEW:
            cfg = named[f"{m}_{size}"]
            assert cfg.method == m and methods.config_name_for(m, size) == f"{m}_{size}"
            assert TRAIN_CONFIGS[f"{m}_{size}"].model == f"{m}_{size}"
            # the train config is the LCKD size's schedule, changed only in the model
            assert dataclasses.replace(TRAIN_CONFIGS[f"{m}_{size}"], model=size) == TRAIN_CONFIGS[size]
    assert methods.config_name_for("lckd", "small2d") == "small2d"
    assert isinstance(methods.build("small2d"), LCKDNet)
    with pytest.raises(ValueError, match="unknown method"):
        methods.config_name_for("nope")
    with pytest.raises(ValueError, match="unknown model config"):
        methods.build("nope_small2d")


@pytest.mark.parametrize("name", ["small2d", "hemis_small2d", "regionfusion_small", "dropout_small"])
def test_config_dicts_round_trip_and_rebuild_the_model(name):
    cfg = methods.as_config(name)
    d = methods.config_to_dict(cfg)
    assert ("method" in d) == (name != "small2d")  # LCKD's dicts stay method-less (old checkpoints)
    assert methods.config_from_dict(d) == cfg
    a, b = methods.build(d), methods.build(cfg)
    assert type(a) is type(b) and parameter_count(a) == parameter_count(b)
    with pytest.raises(ValueError, match="unknown"):
        methods.config_from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="unknown method"):
        methods.config_from_dict({**d, "method": "nope"})


def test_model_config_for_sets_the_input_contract_of_any_method():
    cfg = model_config_for(get_train_config("tiny", model="hemis_small2d", normalization="clip_zscore"),
                           (6.0, 6.0, 6.0))
    assert cfg.method == "hemis" and cfg.roi_size == (32, 32) and cfg.spacing == (6.0, 6.0, 6.0)
    assert cfg.normalization == "clip_zscore"
    again = model_config_for(get_train_config("tiny", model=methods.config_to_dict(cfg)))
    assert again.method == "hemis" and again.widths == cfg.widths


@pytest.mark.parametrize("method", NEW)
def test_each_method_trains_evaluates_and_reloads(method, cases, tmp_path):
    res = train(get_train_config("tiny", model=f"{method}_small2d"), cases, out_dir=tmp_path, progress=False)
    steps = [r for r in res.history if r["kind"] == "step"]
    assert len(steps) == 8 and all(np.isfinite(r["loss"]) for r in steps)
    assert all(r["kd"] == 0.0 for r in steps)  # no per-modality features: nothing to distil
    assert all(r["subset"] != "flair+t1+t1ce+t2" for r in steps[4:])  # stage 2: random missing modalities
    ev = evaluate(res.model, cases[3:], hd95=False)
    assert ev.dice_table().shape == (15, 3) and np.isfinite(ev.dice_table()).all()
    model, ckpt = load_model(tmp_path / "final.pt")
    assert type(model) is type(res.model) and ckpt["config"]["model_config"]["method"] == method
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(ALL_PRESENT))[0], res.model(x, torch.tensor(ALL_PRESENT))[0])


# a method written by a user, in a few lines: each modality's 3x3 conv, averaged over the available
# ones, then a 1x1 conv to the three regions


@dataclass(frozen=True)
class MeanConvConfig:
    name: str = "meanconv_small2d"
    method: str = "meanconv"
    spatial_dims: int = 2
    roi_size: tuple = (32, 32)
    spacing: tuple | None = None
    normalization: str = "zscore"
    size_divisor: tuple = (1, 1)


class MeanConvNet(nn.Module):
    def __init__(self, config: MeanConvConfig):
        super().__init__()
        self.config = config
        self.convs = nn.ModuleList(nn.Conv2d(1, 8, 3, padding=1) for _ in MODALITIES)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, images, available):
        mask = torch.as_tensor(available, dtype=torch.bool).expand(images.shape[0], 4)
        feats = [torch.where(mask[:, m].view(-1, 1, 1, 1), conv(images[:, m:m + 1]), 0.0)
                 for m, conv in enumerate(self.convs)]
        return self.head(sum(feats) / mask.sum(1).view(-1, 1, 1, 1)), None


@pytest.fixture
def meanconv():
    methods.register("meanconv", MeanConvConfig, MeanConvNet, {"meanconv_small2d": MeanConvConfig()})
    yield
    methods.unregister("meanconv")


def test_a_custom_model_gets_the_same_15_subset_table(meanconv, cases, tmp_path):
    res = train(get_train_config("tiny", model="meanconv_small2d"), cases, out_dir=tmp_path, progress=False)
    assert isinstance(res.model, MeanConvNet) and res.model.config.spacing == (6.0, 6.0, 6.0)
    ev = evaluate(res.model, cases[3:], hd95=False)
    table = ev.dice_table()
    assert table.shape == (15, 3) and np.isfinite(table).all()
    assert [tuple(m) for m in ev.subsets] == list(SUBSETS)
    model, ckpt = load_model(tmp_path / "final.pt")  # rebuilt through the registry
    assert isinstance(model, MeanConvNet) and ckpt["config"]["model_config"]["method"] == "meanconv"
    again = evaluate(model, cases[3:], hd95=False).dice_table()
    assert np.array_equal(again, table)


def test_register_refuses_configs_that_cannot_be_stored():
    @dataclass(frozen=True)
    class NoMethod:
        name: str = "x"
        spatial_dims: int = 2
        roi_size: tuple = (32, 32)
        spacing: tuple | None = None
        normalization: str = "zscore"

    with pytest.raises(TypeError, match="method"):
        methods.register("nomethod", NoMethod, MeanConvNet)

    @dataclass(frozen=True)
    class WrongDefault(MeanConvConfig):
        method: str = "other"

    with pytest.raises(TypeError, match="default"):
        methods.register("wrongdefault", WrongDefault, MeanConvNet)
    with pytest.raises(ValueError, match="another method"):
        methods.register("thief", _thief_config(), MeanConvNet, {"small2d": None})  # LCKD's name
    assert {"nomethod", "wrongdefault", "thief"}.isdisjoint(methods.REGISTRY)
    with pytest.raises(ValueError):
        methods.unregister("lckd")


def _thief_config():
    @dataclass(frozen=True)
    class Thief(MeanConvConfig):
        method: str = "thief"

    return Thief
