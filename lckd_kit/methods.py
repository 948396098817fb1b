"""Four ways to survive a missing modality, behind one interface.

The kit trains and evaluates LCKD (:mod:`lckd_kit.model`). This module adds three other ideas from
the missing-modality literature, at CPU size, so that all of them go through the SAME training loop
(:func:`lckd_kit.train.train`), the same 15-subset evaluation (:func:`lckd_kit.evaluate.evaluate`),
the same explorer and the same comparison (:mod:`lckd_kit.compare`):

================  ==================================  ==============================================
method            where the modalities meet            what happens to a missing one
================  ==================================  ==============================================
``lckd``          bottleneck + skips of ONE shared     its slot gets the mean of the available
                  encoder; KD pulls features together  modalities' features (model.LCKDNet)
``dropout``       at the input: one U-Net on the       its channel is zeroed; the net learns to cope
                  4-channel image                      by being trained with random missing channels
``hemis``         at every scale: mean and variance    it is left out of the mean and variance; its
                  over per-modality encoders           encoder is not even run (Havaei et al. 2016)
``regionfusion``  at every scale: per-region weighted  its weight is 0; the others' weights are
                  sum of per-modality encoders         re-normalised (softmax) (after Ding et al. 2021)
================  ==================================  ==============================================

Each method is one class with a frozen config dataclass, registered by name (the registry is
:mod:`lckd_kit.registry`, re-exported here): ``build(config)`` makes a model from a config, a named
config (``"hemis_small2d"``) or a stored dict; ``config_from_dict`` reads a checkpoint's
``"model_config"`` (a dict without a ``"method"`` key is LCKD, so older checkpoints still load).

The interface a method must provide (docs/methods.md has the long version)
----------------------------------------------------------------------------
``model.config``, a frozen dataclass with:

* ``name`` (str), ``method`` (str, the registered name; LCKD's ModelConfig has none: it is the default)
* ``spatial_dims`` (2: axial slices, or 3), ``roi_size`` (the training window, kit layout X, Y[, Z])
* ``size_divisor`` (property: every input axis must be a multiple of it)
* ``spacing`` (None or 3 floats, mm) and ``normalization`` (``"zscore"``): set by training from the
  data (``train.model_config_for`` uses ``dataclasses.replace`` on these three fields and ``roi_size``)

``model(images, available) -> (logits, features)``:

* ``images`` (B, 4, *S) in MODALITIES order (FLAIR, T1, T1ce, T2), normalised;
* ``available`` a bool mask (4,) shared by the batch, or (B, 4) per sample;
* ``logits`` (B, 3, *S): sigmoid logits for ET, TC, WT (REGIONS order);
* ``features`` (B, 4, C, *s) per-modality features if the method wants LCKD's distillation loss,
  else ``None`` (then training is plain segmentation loss, whatever ``no_kd`` says);
* the content of a missing modality's channel must never change the output.

Optional: ``encode(images)`` and ``decode(encoding, mask)`` -- when present, inference encodes each
window once and decodes every subset from it (worth it when the modalities are encoded separately,
as in HeMIS and region fusion). ``encode(...).bottleneck`` (B, 4, C, *b) then also feeds training's
feature probe. The explorer's feature-blend sliders are LCKD-only (they rebuild LCKD's Encoding).

Sizes. The ``*_small2d`` configs have about as many parameters as LCKD's ``small2d`` (0.49 M) and
the ``*_small`` configs about as many as ``small`` (0.92 M); every method has total stride 16, like
them, so the same crops and windows fit. ``parameter_table()`` lists the counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetResBlock
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_norm_layer

from lckd_kit import MODALITIES, REGIONS
from lckd_kit import model as lckd_model
# the registry lives in lckd_kit.registry (which registers LCKD); it is used from here, as always
from lckd_kit.registry import (REGISTRY, REQUIRED_FIELDS, Method, as_config, build, config_from_dict,  # noqa: F401
                               config_name_for, config_to_dict, method_of, model_configs, parameter_table,
                               register, unregister)

N_MOD = len(MODALITIES)  # 4
N_OUT = len(REGIONS)  # 3: ET, TC, WT

#: instance norm with a learned scale and shift, LeakyReLU 0.01: the same choices as LCKDNet
NORM = ("instance", {"affine": True})
ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a method's U-Net, shared by the three methods of this module.

    ``widths[i]`` channels at encoder level i (level 0 at ``stem_stride``, each further level
    halves the resolution), ``decoder_widths[i]`` channels of the decoder stage that ends at level i
    (one fewer entry than ``widths``). For the per-modality methods ``widths`` is the width of EACH
    modality's encoder. The last three fields are the input contract (see the module docstring).
    """

    name: str
    method: str = ""
    spatial_dims: int = 2
    widths: tuple[int, ...] = (8, 16, 32, 48, 64)
    decoder_widths: tuple[int, ...] = (16, 16, 32, 48)
    stem_stride: int = 1
    roi_size: tuple[int, ...] = (64, 64)
    spacing: tuple[float, float, float] | None = None
    normalization: str = "zscore"

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.roi_size) != self.spatial_dims:
            raise ValueError(f"roi_size must have {self.spatial_dims} entries, got {self.roi_size}")
        if len(self.widths) < 2 or len(self.decoder_widths) != len(self.widths) - 1:
            raise ValueError(f"need >= 2 encoder levels and one decoder stage fewer: widths {self.widths}, "
                             f"decoder_widths {self.decoder_widths}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be 3 positive voxel sizes in mm (X, Y, Z), got {self.spacing}")

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Every input axis must be a multiple of this (the stem stride times 2 per deeper level)."""
        return (self.stem_stride * 2 ** (len(self.widths) - 1),) * self.spatial_dims


@dataclass(frozen=True)
class DropoutConfig(UNetConfig):
    """Input-level fusion with modality dropout: ``widths`` is the one encoder's."""

    method: str = "dropout"


@dataclass(frozen=True)
class HeMISConfig(UNetConfig):
    """HeMIS: ``widths`` is each of the four modality encoders'."""

    method: str = "hemis"


@dataclass(frozen=True)
class RegionFusionConfig(UNetConfig):
    """Region-aware fusion: ``widths`` per modality encoder; ``weight_hidden`` the hidden width of
    the small per-region network that predicts the modality weights."""

    method: str = "regionfusion"
    weight_hidden: int = 16


# ----------------------------------------------------------------------------------------------
# building blocks (MONAI's nnU-Net blocks: conv -> instance norm -> LeakyReLU, with residuals)


class Encoder(nn.Module):
    """A U-Net encoder: one residual block per level. (N, cin, *S) -> [level 0, ..., deepest] maps."""

    def __init__(self, d: int, cin: int, widths: Sequence[int], stem_stride: int):
        super().__init__()
        strides = [stem_stride] + [2] * (len(widths) - 1)
        chans = [cin, *widths]
        self.levels = nn.ModuleList(UnetResBlock(d, chans[i], chans[i + 1], kernel_size=3, stride=strides[i],
                                                 norm_name=NORM, act_name=ACT) for i in range(len(widths)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        return maps


class Decoder(nn.Module):
    """The shared U-Net decoder: from the deepest fused map up, each stage is a transposed conv
    (x2), concatenation with that level's fused skip map, and a two-conv block; then a 1x1 conv to
    the 3 region logits, upsampled by the stem stride to the input size.

    ``skip_widths[i]``: channels of the fused map at level i (what the fusion hands over)."""

    def __init__(self, d: int, skip_widths: Sequence[int], decoder_widths: Sequence[int], stem_stride: int):
        super().__init__()
        self.d, self.stem_stride = d, stem_stride
        convT = Conv[Conv.CONVTRANS, d]
        ups, blocks = [], []
        cin = skip_widths[-1]
        for i in reversed(range(len(decoder_widths))):  # stage ending at level i
            w = decoder_widths[i]
            ups.append(convT(cin, w, kernel_size=2, stride=2, bias=False))
            blocks.append(UnetBasicBlock(d, w + skip_widths[i], w, kernel_size=3, stride=1, norm_name=NORM,
                                         act_name=ACT))
            cin = w
        self.ups, self.blocks = nn.ModuleList(ups), nn.ModuleList(blocks)
        self.out = UnetOutBlock(d, cin, N_OUT)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        x = maps[-1]
        for k, (up, block) in enumerate(zip(self.ups, self.blocks)):
            x = block(torch.cat([up(x), maps[-2 - k]], dim=1))
        logits = self.out(x)
        if self.stem_stride != 1:
            logits = F.interpolate(logits, scale_factor=self.stem_stride,
                                   mode="trilinear" if self.d == 3 else "bilinear", align_corners=False)
        return logits


class MissingModalityNet(nn.Module):
    """What every method here shares: the config, the input checks and the availability mask.

    The checks are LCKDNet's (same messages, same rules): images (B, 4, *S) with S a multiple of
    ``size_divisor``; a mask (4,) or (B, 4) of bools with at least one modality per sample.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config

    @property
    def size_divisor(self) -> tuple[int, ...]:
        return self.config.size_divisor

    check_input = lckd_model.LCKDNet.check_input
    availability = lckd_model.LCKDNet.availability

    def _init_weights(self) -> None:
        for m in self.modules():  # He init for the LeakyReLU convs (as LCKDNet)
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _mask(self, images: torch.Tensor, available) -> torch.Tensor:
        """(B, 4) bool mask on the CPU, after checking the images."""
        self.check_input(images)
        return self.availability(available, images.shape[0])


@dataclass
class ModalityEncoding:
    """Every modality of a batch encoded by its own encoder, at every level.

    levels: tensors (B, 4, C_i, *s_i), level 0 first. Slots of modalities that were not encoded
    (``forward`` encodes only the available ones) hold zeros and are never read by the fusion.
    """

    levels: list[torch.Tensor]

    @property
    def bottleneck(self) -> torch.Tensor:
        """(B, 4, C, *b): the deepest level (what training's feature probe measures)."""
        return self.levels[-1]


class PerModalityNet(MissingModalityNet):
    """Four modality encoders, a fusion at each level, one shared decoder (HeMIS, region fusion).

    Subclasses provide ``self.fusions`` (one module per level) and ``_fuse(level, feats, mask)``.
    """

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        d = config.spatial_dims
        self.encoders = nn.ModuleList(Encoder(d, 1, config.widths, config.stem_stride) for _ in MODALITIES)

    def encode_available(self, images: torch.Tensor, mask: torch.Tensor) -> ModalityEncoding:
        """Run modality m's encoder only on the samples that have m; other slots stay zero.

        A modality that no sample has is never encoded at all. InstanceNorm works per sample, so a
        sample's features do not depend on which other samples share its batch."""
        B = images.shape[0]
        per_mod: list[list[torch.Tensor] | None] = []
        for m, enc in enumerate(self.encoders):
            rows = torch.nonzero(mask[:, m]).flatten()
            if len(rows) == 0:
                per_mod.append(None)
                continue
            maps = enc(images[rows.to(images.device), m:m + 1])
            if len(rows) < B:  # scatter back into a zero (B, C, *s) map, out of place (autograd)
                idx = rows.to(images.device)
                maps = [x.new_zeros((B, *x.shape[1:])).index_copy(0, idx, x) for x in maps]
            per_mod.append(maps)
        ref = next(p for p in per_mod if p is not None)
        levels = []
        for i, x in enumerate(ref):
            zero = x.new_zeros(x.shape)
            levels.append(torch.stack([p[i] if p is not None else zero for p in per_mod], dim=1))
        return ModalityEncoding(levels)

    def encode(self, images: torch.Tensor) -> ModalityEncoding:
        """All four modalities of every sample encoded once (inference decodes every subset from it)."""
        self.check_input(images)
        return self.encode_available(images, torch.ones(images.shape[0], N_MOD, dtype=torch.bool))

    def decode(self, enc: ModalityEncoding, available) -> torch.Tensor:
        """Logits (B, 3, *S) for one subset from an encoding; equals ``forward`` with that subset."""
        B = enc.levels[0].shape[0]
        mask = self.availability(available, B)
        dev_mask = mask.to(enc.levels[0].device)
        fused = [self._fuse(i, f, dev_mask) for i, f in enumerate(enc.levels)]
        return self.decoder(fused)

    def forward(self, images: torch.Tensor, available) -> tuple[torch.Tensor, None]:
        """images (B, 4, *S), available (4,) or (B, 4) -> (logits (B, 3, *S), None).

        Only the available modalities are encoded; missing channels are never read."""
        mask = self._mask(images, available)
        enc = self.encode_available(images, mask)
        dev_mask = mask.to(images.device)
        fused = [self._fuse(i, f, dev_mask) for i, f in enumerate(enc.levels)]
        return self.decoder(fused), None

    def _fuse(self, level: int, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _slot_mask(mask: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """(B, 4) bool -> (B, 4, 1, ..., 1) float, broadcastable against feats (B, 4, C, *s)."""
    return mask.view(*mask.shape, *[1] * (feats.dim() - 2)).to(feats.dtype)


# ----------------------------------------------------------------------------------------------
# 1. modality dropout: input-level fusion


class DropoutUNet(MissingModalityNet):
    """Modality dropout with input-level fusion: ONE U-Net on the 4-channel image.

    The simplest thing that works: concatenate the modalities as channels (early fusion) and, for a
    missing one, feed zeros in its channel -- zero is the mean of a z-scored scan, i.e. "no
    information". Trained with random missing modalities (the training loop's stage 2), the net
    learns not to rely on any one channel. This is the baseline practitioners reach for first
    (ModDrop, Neverova et al. 2016, did this for gesture recognition; in brain-tumour segmentation
    it is the usual first baseline).

    The model zeroes the channels itself from ``available``: whatever a missing channel contains,
    the first convolution sees exactly 0 there. No per-modality features: nothing to distil.
    """

    def __init__(self, config: DropoutConfig):
        super().__init__(config)
        d = config.spatial_dims
        self.encoder = Encoder(d, N_MOD, config.widths, config.stem_stride)
        self.decoder = Decoder(d, config.widths, config.decoder_widths, config.stem_stride)
        self._init_weights()

    def forward(self, images: torch.Tensor, available) -> tuple[torch.Tensor, None]:
        """images (B, 4, *S), available (4,) or (B, 4) -> (logits (B, 3, *S), None)."""
        mask = self._mask(images, available).to(images.device)
        keep = mask.view(*mask.shape, *[1] * (images.dim() - 2))
        x = torch.where(keep, images, 0.0)  # where, not *: a NaN in a missing channel becomes 0 too
        return self.decoder(self.encoder(x)), None


# ----------------------------------------------------------------------------------------------
# 2. HeMIS: mean and variance over the available modalities


class HeMISFusion(nn.Module):
    """HeMIS's "abstraction layer": the first two moments over the available modalities.

    feats (B, 4, C, *s), mask (B, 4) -> (B, 2C, *s) = [mean, variance] over the available
    modalities, per channel and voxel. Missing slots are left out (not filled); the variance is the
    population variance, exactly 0 when only one modality is there (HeMIS sets it to zero then).
    No parameters: any number of modalities maps to the same fixed-size representation."""

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = _slot_mask(mask, feats)
        n = m.sum(1)  # (B, 1, ...) number of available modalities
        mean = torch.where(m > 0, feats, 0.0).sum(1) / n  # where, not *: nothing leaks from a missing slot
        var = torch.where(m > 0, (feats - mean.unsqueeze(1)).square(), 0.0).sum(1) / n
        return torch.cat([mean, var], dim=1)


class HeMISNet(PerModalityNet):
    """HeMIS (Havaei et al., MICCAI 2016), as a U-Net.

    Each modality has its OWN encoder (the "back end"); at each level the features of the modalities
    at hand are summarised by their mean and variance (:class:`HeMISFusion`), which do not care how
    many modalities there are; one shared decoder (the "front end") segments from those moments. A
    missing modality is simply left out of the moments -- its encoder is not even run.

    The 2016 paper fused once, before a small conv front end; fusing at every scale and decoding
    with skip connections follows the U-Net versions of HeMIS used as baselines since (e.g. U-HVED,
    Dorent et al. 2019; RFNet's comparison).
    """

    def __init__(self, config: HeMISConfig):
        super().__init__(config)
        self.fusion = HeMISFusion()
        self.decoder = Decoder(config.spatial_dims, [2 * w for w in config.widths], config.decoder_widths,
                               config.stem_stride)
        self._init_weights()

    def _fuse(self, level: int, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fusion(feats, mask)

    @torch.no_grad()
    def moments(self, images: torch.Tensor, available) -> list[torch.Tensor]:
        """The fused maps per level, (B, 2C_i, *s_i): channels [:C_i] mean, [C_i:] variance."""
        mask = self._mask(images, available)
        enc = self.encode_available(images, mask)
        return [self.fusion(f, mask.to(f.device)) for f in enc.levels]


# ----------------------------------------------------------------------------------------------
# 3. region-aware fusion (in the spirit of RFNet)


class RegionAwareFusion(nn.Module):
    """Fuse the modalities with one set of weights PER REGION (ET, TC, WT), predicted from the data.

    feats (B, 4, C, *s), mask (B, 4) ->  fused (B, C, *s) and weights (B, 4, 3).

    1. Region maps ``P`` (B, 3, *s): a 1x1 conv + sigmoid on the concatenated features (missing
       modalities' slots are zeros), one soft map per region.
    2. Per modality m and region r, a descriptor ``g[m, r]`` (C): m's features averaged over the
       voxels of region r (weighted by ``P_r``).
    3. Per region, a small network reads all four descriptors and scores each modality; missing
       modalities are masked out (-inf) and a softmax over the rest gives ``w[:, m, r]``: every
       region's weights sum to 1 over the available modalities and are 0 for the missing ones.
    4. Per region, ``H_r = P_r * sum_m w[m, r] f_m``; with the plain mean of the available
       modalities (the background / shortcut term), 1x1 conv -> IN -> LeakyReLU -> (B, C, *s).

    So a modality can dominate the fused features where it is informative (T1ce for the enhancing
    tumour, FLAIR for the whole tumour) and step back elsewhere, and when it is missing its share
    goes to the others.
    """

    def __init__(self, d: int, c: int, hidden: int):
        super().__init__()
        conv = Conv[Conv.CONV, d]
        self.region_maps = conv(N_MOD * c, N_OUT, kernel_size=1)
        self.scorers = nn.ModuleList(nn.Sequential(nn.Linear(N_MOD * c, hidden), nn.LeakyReLU(0.01),
                                                   nn.Linear(hidden, N_MOD)) for _ in REGIONS)
        self.project = nn.Sequential(conv(N_OUT * c + c, c, kernel_size=1, bias=False),
                                     get_norm_layer(NORM, d, c), get_act_layer(ACT))

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, _, C = feats.shape[:3]
        m = _slot_mask(mask, feats)
        feats = torch.where(m > 0, feats, 0.0)  # a missing slot is exactly zero, whatever it held
        probs = torch.sigmoid(self.region_maps(feats.flatten(1, 2)))  # (B, 3, *s)
        spatial = tuple(range(4, feats.dim() + 1))  # the voxel axes of (B, 4, 3, C, *s)
        # g[b, m, r, c] = sum_s P_r f_m / sum_s P_r: m's features over region r
        num = (feats.unsqueeze(2) * probs.unsqueeze(1).unsqueeze(3)).sum(spatial)  # (B, 4, 3, C)
        g = num / (probs.flatten(2).sum(-1).view(B, 1, N_OUT, 1) + 1e-6)
        scores = torch.stack([s(g[:, :, r].flatten(1)) for r, s in enumerate(self.scorers)], dim=-1)  # (B, 4, 3)
        scores = scores.masked_fill(~mask.view(B, N_MOD, 1), float("-inf"))
        weights = torch.softmax(scores, dim=1)  # over the modalities; exactly 0 where missing
        wv = weights.view(B, N_MOD, N_OUT, 1, *[1] * (feats.dim() - 3))
        per_region = (feats.unsqueeze(2) * wv).sum(1) * probs.unsqueeze(2)  # (B, 3, C, *s)
        mean = feats.sum(1) / m.sum(1)
        fused = self.project(torch.cat([per_region.flatten(1, 2), mean], dim=1))
        return fused, weights


class RegionFusionNet(PerModalityNet):
    """Region-aware fusion in the spirit of RFNet (Ding et al., ICCV 2021).

    Like HeMIS, one encoder per modality and a shared decoder; unlike HeMIS, the fusion at each level
    LEARNS how much each available modality should contribute, separately for each tumour region
    (:class:`RegionAwareFusion`). ``region_weights`` shows those weights.

    Simplified from RFNet (docs/methods.md): region maps are not supervised, there is no shared-
    weight per-modality decoder regulariser and no deep supervision; the regions are the nested
    evaluation regions (ET, TC, WT) rather than the label classes.
    """

    def __init__(self, config: RegionFusionConfig):
        super().__init__(config)
        d = config.spatial_dims
        self.fusions = nn.ModuleList(RegionAwareFusion(d, w, config.weight_hidden) for w in config.widths)
        self.decoder = Decoder(d, config.widths, config.decoder_widths, config.stem_stride)
        self._init_weights()

    def _fuse(self, level: int, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fusions[level](feats, mask)[0]

    @torch.no_grad()
    def region_weights(self, images: torch.Tensor, available) -> list[torch.Tensor]:
        """The fusion weights per level, (B, 4, 3): modality x region (ET, TC, WT); each column sums
        to 1 over the available modalities, missing ones are 0."""
        mask = self._mask(images, available)
        enc = self.encode_available(images, mask)
        return [fusion(f, mask.to(f.device))[1] for fusion, f in zip(self.fusions, enc.levels)]


# ----------------------------------------------------------------------------------------------
# the kit's methods, registered (lckd_kit.registry holds the registry and registers LCKD)


# widths chosen so each method's parameter count is within a few % of LCKD's at the same size
# (tests/test_methods.py pins the ratios)
_SIZES = {
    "small2d": dict(spatial_dims=2, stem_stride=1, roi_size=(64, 64)),
    # 3-D: like LCKD's "small", the first level already halves the resolution (its stem stride 2),
    # which keeps 64^3 crops affordable on a CPU; logits are upsampled back
    "small": dict(spatial_dims=3, stem_stride=2, roi_size=(64, 64, 64)),
}
_WIDTHS = {
    ("dropout", "small2d"): dict(widths=(16, 32, 48, 72, 104), decoder_widths=(16, 24, 32, 48)),
    ("hemis", "small2d"): dict(widths=(8, 16, 24, 40, 52), decoder_widths=(16, 24, 32, 48)),
    ("regionfusion", "small2d"): dict(widths=(8, 16, 24, 40, 48), decoder_widths=(16, 24, 32, 48), weight_hidden=16),
    ("dropout", "small"): dict(widths=(16, 32, 56, 80), decoder_widths=(16, 32, 56)),
    ("hemis", "small"): dict(widths=(8, 16, 28, 48), decoder_widths=(16, 32, 48)),
    ("regionfusion", "small"): dict(widths=(8, 16, 28, 48), decoder_widths=(16, 32, 48), weight_hidden=16),
}
_CLASSES = {"dropout": (DropoutConfig, DropoutUNet, "modality dropout, input-level fusion (one U-Net)"),
            "hemis": (HeMISConfig, HeMISNet, "HeMIS: per-modality encoders, mean + variance fusion"),
            "regionfusion": (RegionFusionConfig, RegionFusionNet,
                             "region-aware fusion (after RFNet): per-region modality weights")}

#: the methods of this kit, in the order the comparison lists them
METHODS: tuple[str, ...] = ("lckd", "dropout", "hemis", "regionfusion")

for _method, (_cfg_cls, _model_cls, _description) in _CLASSES.items():
    register(_method, _cfg_cls, _model_cls, {
        f"{_method}_{size}": _cfg_cls(name=f"{_method}_{size}", **_SIZES[size], **_WIDTHS[(_method, size)])
        for size in _SIZES}, _description)


__all__ = ["UNetConfig", "DropoutConfig", "HeMISConfig", "RegionFusionConfig", "DropoutUNet", "HeMISNet",
           "RegionFusionNet", "HeMISFusion", "RegionAwareFusion", "ModalityEncoding", "Encoder", "Decoder",
           "MissingModalityNet", "PerModalityNet", "Method", "REGISTRY", "METHODS", "register", "unregister",
           "build", "config_from_dict", "config_to_dict", "as_config", "method_of", "model_configs",
           "config_name_for", "parameter_table"]
