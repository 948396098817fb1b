"""LCKDNet: shapes, parameter count, missing-modality semantics, work sharing, reference weights."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lckd_kit import SUBSETS, NoModalityError, as_mask
from lckd_kit.checkpoint import load_reference_state_dict, to_reference_state_dict
from lckd_kit.model import CONFIGS, InstanceNorm, LCKDNet, build_model, config_from_dict, config_to_dict, parameter_count

#: parameter names and shapes of the reference's DualNet (a copy lives in the repository)
REFERENCE_TSV = Path(__file__).resolve().parent / "data" / "reference_state_dict.tsv"
PAPER_PARAMS = 43_656_672


def reference_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split("\t")
            out[name] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


def random_reference_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the reference's names and shapes; IN affine parameters near (1, 0)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in reference_shapes().items():
        if len(shape) == 1:
            base = 1.0 if name.endswith(".weight") else 0.0
            sd[name] = base + 0.2 * torch.randn(shape, generator=g)
        else:
            fan = math.prod(shape[1:]) if "transposeconv" not in name else shape[0] * math.prod(shape[2:])
            sd[name] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan)
    return sd


@pytest.fixture(scope="module")
def paper():
    torch.manual_seed(0)
    return build_model("paper")


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return build_model("small")


# ---------------------------------------------------------------- configs, shapes, counts


def test_paper_parameter_count(paper):
    assert parameter_count(paper) == PAPER_PARAMS
    assert len(paper.state_dict()) == 221  # no buffers, like the reference


def test_paper_shapes(paper):
    # the reference's 1x4x32x64x64 (D, H, W) test input, in kit layout (X, Y, Z)
    with torch.no_grad():
        logits, feats = paper(torch.randn(1, 4, 64, 64, 32), (True, True, False, True))
    assert logits.shape == (1, 3, 64, 64, 32)
    assert feats.shape == (1, 4, 256, 2, 2, 2)
    assert torch.isfinite(logits).all()


def test_config_dict_round_trip():
    for cfg in CONFIGS.values():
        d = config_to_dict(cfg)
        assert config_from_dict(json.loads(json.dumps(d))) == cfg
    assert parameter_count(build_model(config_to_dict(CONFIGS["small"]))) == parameter_count(build_model("small"))
    with pytest.raises(ValueError):
        config_from_dict({**config_to_dict(CONFIGS["small"]), "bogus": 1})
    with pytest.raises(ValueError):
        build_model("nope")


@pytest.mark.parametrize("name,spatial,bottleneck", [
    ("small", (32, 32, 48), (2, 2, 3)),
    ("small2d", (32, 48), (2, 3)),
])
def test_small_shapes(name, spatial, bottleneck):
    torch.manual_seed(0)
    model = build_model(name)
    logits, feats = model(torch.randn(2, 4, *spatial), (True, False, True, True))
    assert logits.shape == (2, 3, *spatial)
    assert feats.shape == (2, 4, model.config.bottleneck_width, *bottleneck)
    assert torch.isfinite(logits).all()


def test_wrong_sizes_raise(small):
    with pytest.raises(ValueError, match="divisible"):
        small(torch.zeros(1, 4, 32, 32, 40), (True,) * 4)
    with pytest.raises(ValueError, match="single voxel"):
        small(torch.zeros(1, 4, 16, 16, 16), (True,) * 4)
    with pytest.raises(ValueError, match="shape"):
        small(torch.zeros(1, 4, 32, 32), (True,) * 4)  # 2-D input to a 3-D model
    with pytest.raises(ValueError, match="shape"):
        small(torch.zeros(1, 3, 32, 32, 32), (True,) * 3)
    with pytest.raises(ValueError, match="divisible"):
        build_model("small2d")(torch.zeros(1, 4, 40, 32), (True,) * 4)
    assert CONFIGS["paper"].size_divisor == (32, 32, 16)


def test_availability_is_a_bool_mask_and_as_mask_reads_the_other_spellings(small):
    x = torch.randn(2, 4, 32, 32, 16)
    small.eval()
    with torch.no_grad():
        ref, _ = small(x, (True, False, True, False))
        masks = [torch.tensor([True, False, True, False]), torch.tensor([[True, False, True, False]] * 2),
                 np.array([True, False, True, False]), [np.bool_(True), np.bool_(False), np.bool_(True), np.bool_(False)]]
        for mask in masks:
            torch.testing.assert_close(small(x, mask)[0], ref)
        for spelling in ["flair+t1ce", [0, 2], ["flair", "t1ce"]]:
            with pytest.raises(ValueError, match="as_mask"):  # the model reads masks only ...
                small(x, spelling)
            torch.testing.assert_close(small(x, as_mask(spelling))[0], ref)  # ... as_mask makes one
    with pytest.raises(NoModalityError):
        small(x, (False,) * 4)
    with pytest.raises(ValueError, match="3 rows"):
        small(x, [(True,) * 4] * 3)  # 3 rows for a batch of 2
    small.train()


# ---------------------------------------------------------------- missing-modality semantics


@pytest.mark.parametrize("subset", [SUBSETS[0], SUBSETS[5], SUBSETS[11], SUBSETS[2]])
def test_missing_channel_is_never_read(small, subset):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 32, 32, 16)
    y = x.clone()
    missing = [m for m in range(4) if not subset[m]]
    y[:, missing] = float("nan")  # NaN would poison anything that reads it, even a multiply by 0
    small.eval()
    with torch.no_grad():
        for naive in (False, True):
            lx, fx = small(x, subset, naive=naive)
            ly, fy = small(y, subset, naive=naive)
            assert torch.equal(lx, ly)
            assert torch.equal(fx, fy)
        torch.testing.assert_close(small.decode(small.encode(y), subset), lx, rtol=1e-5, atol=1e-5)
    small.train()


def test_missing_features_are_zero_response_and_fill_is_mean():
    torch.manual_seed(2)
    model = build_model("small").eval()
    x = torch.randn(2, 4, 32, 32, 16)
    with torch.no_grad():
        _, feats = model(x, (True, False, True, False))
        zero_b, _ = model.encoder(torch.zeros(1, 1, 32, 32, 16))
        for b in range(2):
            for m in (1, 3):
                torch.testing.assert_close(feats[b, m], zero_b[0], rtol=1e-5, atol=1e-6)
        # the decoder must see mean(flair, t1ce) in the t1 and t2 blocks: feed that explicitly
        enc = model.encode(x)
        filled = enc.bottleneck.clone()
        filled[:, [1, 3]] = enc.bottleneck[:, [0, 2]].mean(1, keepdim=True)
        skips = [torch.where(torch.tensor([1, 0, 1, 0], dtype=torch.bool).view(1, 4, 1, 1, 1, 1), s, z)
                 for s, z in zip(enc.skips, enc.zero_skips)]
        manual = model.decoder(filled.flatten(1, 2), [s.flatten(1, 2) for s in skips])
        manual = F.interpolate(manual, size=(32, 32, 16), mode="trilinear", align_corners=False)
        torch.testing.assert_close(model(x, (True, False, True, False))[0], manual, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- work sharing == reference encoding


# Through the zero-input path every InstanceNorm up to layer1's first 3^d conv sees an exactly constant
# map (variance 0 < eps), so the true gradient these parameters get from that path is exactly zero and
# any float computation of it (the reference's included) returns rounding noise amplified by
# 1/sqrt(eps) ~ 316 per such norm. And the ASPP global branch is a per-channel constant that conv_cat's
# InstanceNorm subtracts again, so branch5's gradient is zero up to rounding. These are compared
# against the overall gradient scale; everything else tightly.
ILL_CONDITIONED = ("encoder.backbone.norm1.", "encoder.backbone.layer1.0.conv1.", "encoder.backbone.layer1.0.norm1.",
                   "encoder.backbone.layer1.0.downsample.", "encoder.aspp.branch5_")


@pytest.mark.parametrize("shape", [(3, 5, 7, 6, 4), (6, 5, 9, 8), (2, 4, 1, 3, 1)])
def test_instance_norm_is_torchs_instance_norm(shape):
    """Our GroupNorm-based InstanceNorm (faster on CPU) computes torch's InstanceNorm(affine=True),
    forward and backward, including constant maps (the zero-input path, where var = 0)."""
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[0] = 1.5  # a constant map
    ours = InstanceNorm(c).double()
    ref = (torch.nn.InstanceNorm3d if len(shape) == 5 else torch.nn.InstanceNorm2d)(c, affine=True).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, c, dtype=torch.float64))
            m.bias.copy_(torch.linspace(-0.2, 0.3, c, dtype=torch.float64))
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"] and ours.num_features == c
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-9)


def _randomise_norms(model):
    """IN affine parameters away from their (1, 0) init, like a trained model's."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, InstanceNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model


def _outputs_and_grads(model, x, available, naive, proj):
    x = x.clone().requires_grad_(True)
    logits, feats = model(x, available, naive=naive)
    loss = (logits * proj[0]).mean() + (feats * proj[1]).mean()
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return logits.detach(), feats.detach(), dict(zip(("input", *names), grads))


def _assert_same(a, b):
    la, fa, ga = a
    lb, fb, gb = b
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-5)
    overall = max(float(v.abs().max()) for v in gb.values() if v is not None)
    for name, u in ga.items():
        v = gb[name]
        if u is None or v is None:  # unused (branch5_conv): no gradient on either side
            assert u is None and v is None, name
        elif name.startswith(ILL_CONDITIONED):
            assert float((u - v).abs().max()) <= 1e-2 * overall, name
        else:  # the noise above leaks a little into layer1: 5e-4 of each tensor's own scale
            scale = float(v.abs().max())
            diff = float((u - v).abs().max())
            assert diff <= 5e-4 * scale + 1e-7, f"{name}: max diff {diff:.3g} at scale {scale:.3g}"


def test_work_sharing_equals_naive_all_subsets():
    torch.manual_seed(3)
    model = _randomise_norms(build_model("small").train())
    x = torch.randn(2, 4, 32, 32, 16)
    proj = (torch.randn(2, 3, 32, 32, 16), torch.randn(2, 4, 64, 2, 2, 1))
    for subset in SUBSETS:
        _assert_same(_outputs_and_grads(model, x, subset, False, proj), _outputs_and_grads(model, x, subset, True, proj))


def test_work_sharing_equals_naive_in_float64_everywhere():
    """In float64 the rounding noise of the ill-conditioned zero-input path is gone: every gradient,
    those of ILL_CONDITIONED included, agrees to 1e-7 of the overall gradient scale."""
    torch.manual_seed(3)
    model = _randomise_norms(build_model("small").train()).double()
    x = torch.randn(2, 4, 32, 32, 16, dtype=torch.float64)
    proj = (torch.randn(2, 3, 32, 32, 16, dtype=torch.float64), torch.randn(2, 4, 64, 2, 2, 1, dtype=torch.float64))
    for subset in [(False, True, False, False), (True, False, True, True), (True, True, True, True)]:
        (la, fa, ga), (lb, fb, gb) = (_outputs_and_grads(model, x, subset, naive, proj) for naive in (False, True))
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)
        overall = max(float(v.abs().max()) for v in gb.values() if v is not None)
        for name, u in ga.items():
            if u is None or gb[name] is None:
                assert u is None and gb[name] is None, name
                continue
            assert float((u - gb[name]).abs().max()) <= 1e-7 * overall, name


def test_work_sharing_equals_naive_per_sample_masks():
    torch.manual_seed(4)
    model = _randomise_norms(build_model("small").train())
    x = torch.randn(3, 4, 32, 32, 16)
    proj = (torch.randn(3, 3, 32, 32, 16), torch.randn(3, 4, 64, 2, 2, 1))
    for rows in ([SUBSETS[0], SUBSETS[9], SUBSETS[14]], [SUBSETS[3], SUBSETS[3], SUBSETS[12]],
                 torch.tensor([SUBSETS[14]] * 3)):
        _assert_same(_outputs_and_grads(model, x, rows, False, proj), _outputs_and_grads(model, x, rows, True, proj))
    model2 = _randomise_norms(build_model("small2d").train())
    x2 = torch.randn(3, 4, 32, 32)
    proj2 = (torch.randn(3, 3, 32, 32), torch.randn(3, 4, 64, 2, 2))
    rows = [SUBSETS[1], SUBSETS[6], SUBSETS[13]]
    _assert_same(_outputs_and_grads(model2, x2, rows, False, proj2), _outputs_and_grads(model2, x2, rows, True, proj2))


def test_outputs_equal_naive_at_init():
    """At init (IN biases 0) the zero-input path is all zeros; outputs still agree exactly."""
    torch.manual_seed(9)
    model = build_model("small").train()
    x = torch.randn(2, 4, 32, 32, 16)
    for subset in (SUBSETS[0], SUBSETS[7], SUBSETS[13]):
        la, fa = model(x, subset)
        lb, fb = model(x, subset, naive=True)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_encode_decode_equals_forward_all_subsets(small, training):
    torch.manual_seed(5)
    x = torch.randn(2, 4, 32, 32, 16)
    small.train(training)
    with torch.no_grad():
        enc = small.encode(x)
        assert enc.bottleneck.shape == (2, 4, 64, 2, 2, 1) and enc.zero_bottleneck.shape == (64, 2, 2, 1)
        assert [s.shape[:2] for s in enc.skips] == [(2, 4)] * 4
        for subset in (SUBSETS if not training else SUBSETS[::4]):
            torch.testing.assert_close(small.decode(enc, subset), small(x, subset)[0], rtol=1e-5, atol=1e-5)
        mixed = [SUBSETS[2], SUBSETS[10]]
        torch.testing.assert_close(small.decode(enc, torch.tensor(mixed)), small(x, mixed)[0], rtol=1e-5, atol=1e-5)
    small.train()


@pytest.mark.parametrize("name,spatial,weight_std", [("small", (32, 32, 16), True), ("small2d", (32, 32), True),
                                                      ("small", (32, 32, 16), False)])
def test_decode_many_equals_decode(name, spatial, weight_std):
    """decode_many's per-modality shortcut projections and chunked decoder calls change only the
    summation order: every subset's logits equal decode's, for batch 3 and any chunk size."""
    torch.manual_seed(11)
    model = build_model(dataclasses.replace(CONFIGS[name], weight_std=weight_std, roi_size=spatial))
    _randomise_norms(model)
    model.eval()
    x = torch.randn(3, 4, *spatial)
    with torch.no_grad():
        enc = model.encode(x)
        one_by_one = torch.stack([model.decode(enc, s) for s in SUBSETS])  # (15, 3, 3, *S)
        assert one_by_one.abs().max() > 1  # not a degenerate all-zero output
        for chunk in (None, 1, 4, 15):
            many = model.decode_many(enc, SUBSETS, chunk=chunk)
            assert many.shape == (15, 3, 3, *spatial)
            torch.testing.assert_close(many, one_by_one, rtol=1e-4, atol=1e-4)
        # the projection is linear: the zero response's blocks sum to the shortcut conv of 4 zero maps
        ys, zs = model.decoder.project_skips(enc.skips, enc.zero_skips)
        conv = model.decoder.shortcut_conv0[0]
        full = conv(torch.cat([enc.skips[0][:, j] for j in range(4)], 1))
        torch.testing.assert_close(ys[0].sum(1), full, rtol=1e-4, atol=1e-4)
        assert zs[0].shape == (4, *ys[0].shape[2:])


def test_eval_zero_response_cache_invalidated():
    torch.manual_seed(6)
    model = build_model("small").eval()
    x = torch.randn(1, 4, 32, 32, 16)
    single = (False, False, True, False)
    with torch.no_grad():
        first, _ = model(x, single)
        cached = model._zero_cache
        assert cached is not None
        again, _ = model(x, single)
        assert model._zero_cache is cached  # hit: same weights, same shape
        torch.testing.assert_close(again, first)
        w = model.encoder.backbone.layer1[0].conv2.weight
        w.add_(torch.randn_like(w))  # in place, as an optimiser step would
        after, _ = model(x, single)
        assert model._zero_cache is not cached
        naive, _ = model(x, single, naive=True)  # never cached
        torch.testing.assert_close(after, naive, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(after, first)
        model.load_state_dict(model.state_dict())
        assert model._zero_cache is None
    model(x, single)
    model.train()
    assert model._zero_cache is None


def test_weight_standardisation_formula_follows_the_weight():
    """The sum-of-squares variance equals torch.var's; the standardised weight follows every change of
    the weight (nothing is cached) and carries the gradient."""
    torch.manual_seed(7)
    conv = build_model("small").encoder.backbone.layer1[0].conv2

    def by_hand(w):
        c = w.flatten(1) - w.flatten(1).mean(1, keepdim=True)
        return (c / torch.sqrt(c.var(1, keepdim=True) + 1e-12)).view_as(w)

    torch.testing.assert_close(conv.effective_weight(), by_hand(conv.weight), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        first = conv.effective_weight()
        conv.weight.add_(torch.randn_like(conv.weight))  # in place, as an optimiser step
        second = conv.effective_weight()
        assert (second - first).abs().max() > 0.1
        torch.testing.assert_close(second, by_hand(conv.weight), rtol=1e-5, atol=1e-6)
        conv.weight.data.mul_(-1)
        torch.testing.assert_close(conv.effective_weight(), -second)
    w = conv.effective_weight()
    assert w.requires_grad and w.grad_fn is not None
    w.sum().backward()
    assert conv.weight.grad is not None


# ---------------------------------------------------------------- ASPP global branch


def test_aspp_global_branch_is_the_reference_constant(small):
    aspp = small.encoder.aspp
    with torch.no_grad():
        aspp.branch5_norm.bias.copy_(torch.linspace(-1, 1, aspp.branch5_norm.bias.numel()))
    beta = aspp.branch5_norm.bias.detach()
    for seed in (0, 1):
        x = torch.randn(2, 64, 3, 2, 4, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
        out = aspp.global_branch(x)
        expect = F.leaky_relu(beta, 0.01).view(1, -1, 1, 1, 1).expand(2, -1, 3, 2, 4)
        assert torch.equal(out, expect)
        # what old torch computed: pool -> WS conv -> IN of a 1-voxel map (biased var 0) -> act -> upsample
        pooled = aspp.branch5_conv(x.mean((2, 3, 4), keepdim=True))
        normed = (pooled - pooled.mean((2, 3, 4), keepdim=True)) / torch.sqrt(
            pooled.var((2, 3, 4), unbiased=False, keepdim=True) + 1e-5)
        normed = normed * aspp.branch5_norm.weight.view(1, -1, 1, 1, 1) + aspp.branch5_norm.bias.view(1, -1, 1, 1, 1)
        old = F.interpolate(F.leaky_relu(normed, 0.01), size=(3, 2, 4), mode="trilinear", align_corners=True)
        torch.testing.assert_close(out, old)
    small.zero_grad(set_to_none=True)
    aspp(torch.randn(2, 64, 2, 2, 2)).square().sum().backward()
    g = aspp.branch5_conv.weight.grad
    assert g is None or float(g.abs().max()) == 0.0
    # ... and conv_cat's InstanceNorm removes that per-channel constant again: beta has no effect at all
    x = torch.randn(2, 64, 2, 2, 2)
    with torch.no_grad():
        before = aspp(x)
        aspp.branch5_norm.bias.add_(1.0)
        torch.testing.assert_close(aspp(x), before, rtol=1e-4, atol=1e-4)
        aspp.branch5_norm.bias.zero_()
    small.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- reference weights


def test_reference_state_dict_round_trip(paper):
    sd = random_reference_state_dict()
    assert len(sd) == 221 and sum(t.numel() for t in sd.values()) == PAPER_PARAMS
    load_reference_state_dict(paper, sd)
    back = to_reference_state_dict(paper)
    assert list(back) == list(sd) or set(back) == set(sd)
    for name, t in sd.items():
        assert back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    # DataParallel prefixes are accepted
    load_reference_state_dict(paper, {"module." + k: v for k, v in sd.items()})
    with pytest.raises(Exception):
        load_reference_state_dict(paper, {k: v for k, v in sd.items() if "branch5" not in k})


def _ws(w):
    flat = w.flatten(1)
    return ((flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, keepdim=True) + 1e-12)).view_as(w)


def reference_forward(sd, images, avail):
    """The reference DualNet forward in its own layout: images (N, 4, D, H, W), outputs (ET, WT, TC).
    Written from LCKD_SPEC section 1 with the reference's parameter names; old-torch IN semantics."""
    act = lambda t: F.leaky_relu(t, 0.01)  # noqa: E731

    def cbr(t, conv, nrm, stride=1, pad=0, dil=1, relu=True):
        t = F.conv3d(t, _ws(sd[conv]), None, stride, pad, dil)
        t = F.instance_norm(t, weight=sd[nrm + ".weight"], bias=sd[nrm + ".bias"])
        return act(t) if relu else t

    N = images.shape[0]
    x = images.clone()
    x[:, [m for m in range(4) if m not in avail]] = 0
    h = x.reshape(N * 4, 1, *x.shape[2:])
    p = "shared_enc.backbone."
    h = cbr(h, p + "conv1.weight", p + "norm1", stride=(1, 2, 2), pad=3)
    maps = [h]
    h = F.max_pool3d(h, 3, 2, 1)
    for li, (n, s) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2)), 1):
        for b in range(n):
            q, st = f"{p}layer{li}.{b}.", (s if b == 0 else 1)
            o = cbr(h, q + "conv1.weight", q + "norm1")
            o = cbr(o, q + "conv2.weight", q + "norm2", stride=st, pad=1)
            o = cbr(o, q + "conv3.weight", q + "norm3", relu=False)
            sc = cbr(h, q + "downsample.0.weight", q + "downsample.1", stride=st, relu=False) if b == 0 else h
            h = act(o + sc)
        maps.append(h)
    e, a = "shared_enc.", "shared_enc.aspp."
    r = cbr(maps[-1], e + "asppreduce.0.weight", e + "asppreduce.1")
    br = [cbr(r, a + "branch1.0.weight", a + "branch1.1")]
    for k, d in ((2, 2), (3, 4), (4, 8)):
        br.append(cbr(r, f"{a}branch{k}.0.weight", f"{a}branch{k}.1", pad=d, dil=d))
    g = F.conv3d(r.mean((2, 3, 4), keepdim=True), _ws(sd[a + "branch5_conv.weight"]))
    g = (g - g.mean((2, 3, 4), keepdim=True)) / torch.sqrt(g.var((2, 3, 4), unbiased=False, keepdim=True) + 1e-5)
    g = act(g * sd[a + "branch5_norm.weight"].view(1, -1, 1, 1, 1) + sd[a + "branch5_norm.bias"].view(1, -1, 1, 1, 1))
    br.append(F.interpolate(g, size=r.shape[2:], mode="trilinear", align_corners=True))
    f = cbr(torch.cat(br, 1), a + "conv_cat.0.weight", a + "conv_cat.1").view(N, 4, -1, *r.shape[2:])
    fill = f[:, list(avail)].mean(1)
    fused = torch.stack([f[:, m] if m in avail else fill for m in range(4)], 1).flatten(1, 2)
    skips = [t.reshape(N, -1, *t.shape[2:]) for t in maps[:-1]]
    d = "shared_dec."
    h = fused
    for i in (3, 2, 1, 0):
        h = F.conv_transpose3d(h, sd[f"{d}transposeconv_stage{i}.weight"], stride=2)
        h = h + cbr(skips[i], f"{d}shortcut_conv{i}.0.weight", f"{d}shortcut_conv{i}.1")
        q = f"{d}stage{i}_de."
        o = cbr(h, q + "conv1.weight", q + "norm1", pad=1)
        h = act(cbr(o, q + "conv2.weight", q + "norm2", pad=1, relu=False) + h)
    logits = F.conv3d(h, sd[d + "cls_conv.0.weight"])
    return F.interpolate(logits, scale_factor=(1, 2, 2), mode="trilinear"), f


def test_paper_matches_reference_forward(paper):
    """Loading reference weights + the kit layout reproduces the reference computation. In float64:
    in float32 the 50 InstanceNorm layers (the last ones over 8 voxels) amplify rounding to ~1e-3."""
    sd = {k: v.double() for k, v in random_reference_state_dict(seed=7).items()}
    paper.double()
    load_reference_state_dict(paper, sd)
    torch.manual_seed(8)
    # reference layout (N, 4, D, H, W); H != W so a swapped in-plane axis could not pass
    x_ref = torch.randn(1, 4, 16, 64, 32, dtype=torch.float64)
    avail = (0, 2, 3)
    paper.eval()
    try:
        with torch.no_grad():
            ref_logits, ref_feats = reference_forward(sd, x_ref, avail)
            x_kit = x_ref.permute(0, 1, 3, 4, 2)  # (N, 4, X=H, Y=W, Z=D)
            logits, feats = paper(x_kit, (True, False, True, True))
    finally:
        paper.float().train()
    assert logits.shape == (1, 3, 64, 32, 16)
    expect = ref_logits.permute(0, 1, 3, 4, 2)[:, [0, 2, 1]]  # (ET, WT, TC) -> (ET, TC, WT)
    torch.testing.assert_close(logits, expect, rtol=1e-7, atol=1e-7 * float(expect.abs().max()))
    # features: all four slots, the missing T1 one being the zero-input response in both
    torch.testing.assert_close(feats, ref_feats.permute(0, 1, 2, 4, 5, 3), rtol=1e-7, atol=1e-7)
