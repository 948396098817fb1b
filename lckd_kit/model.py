"""The whole LCKD network in one file: shared encoder, bottleneck fusion, decoder.

Data flow for a batch ``images`` (B, 4, *S) in MODALITIES order and a mask ``available``::

    every available (sample, modality) volume  (P, 1, *S)   + one all-zero volume (for the missing ones)
      -> SharedEncoder: WS-conv stem -> maxpool -> 4 Bottleneck layers -> asppreduce -> ASPP
         returns the bottleneck (P+1, C, *b) and 4 skip maps: stem, layer1, layer2, layer3
      -> scattered back to slots (B, 4, ...): a missing slot holds the zero-input response
      -> bottleneck: missing slots replaced by the mean of the sample's available ones, the 4 blocks
         concatenated along channels (modality-major) -> (B, 4C, *b)
      -> skips: the 4 modalities concatenated along channels (missing = zero-input response, not filled)
      -> Decoder: 4 x [ConvTranspose up, + 1x1-reduced skip, BasicBlock] -> 1x1 cls_conv
         -> logits upsampled by the stem stride -> (B, 3, *S), channels REGIONS = (ET, TC, WT), sigmoid

There are no modality-specific parameters: one encoder sees each modality as its own 1-channel
sample, and InstanceNorm is per sample, so the encoding of a volume never depends on the rest of
the batch. That is what makes the work sharing below exact.

Work sharing. The reference encodes all 4·B zeroed inputs. We encode only the available
(sample, modality) pairs plus ONE all-zero volume whose response stands in for every missing
modality (it is the same for every sample). Outputs, losses and gradients equal the reference
computation (``forward(..., naive=True)``) to float tolerance. In eval mode without grad the
zero response is cached per (spatial shape, device, dtype, autocast, parameter versions).
Beware (reference behaviour, kept): along the zero-input path the first InstanceNorms see exactly
constant maps (at init, with IN biases 0, all of them do), where IN's Jacobian is 1/sqrt(eps) ~ 316.
A training step with missing modalities from a fresh init can therefore produce very large gradient
norms; warm up with all modalities (the reference's stage 1) or clip.

Layout. Kit arrays are (X, Y, Z) in RAS with Z the axial (slice) axis LAST; the reference code
feeds (D=axial, H, W). So the "paper" config strides the stem by (2, 2, 1), upsamples the logits
by (2, 2, 1) and uses an roi of (160, 160, 80), i.e. the reference's 80x160x160 crop. The
reference's own weights load with :func:`lckd_kit.checkpoint.load_reference_state_dict`.

Input sizes: every spatial axis must be divisible by the config's total stride
(``LCKDNet.size_divisor``; paper: 32, 32, 16) and the bottleneck must have more than one voxel
(InstanceNorm needs it). ``LCKDNet.check_input`` raises ``ValueError`` otherwise.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool

from lckd_kit import MODALITIES, REGIONS, NoModalityError
# the layers live in lckd_kit.layers; InstanceNorm and the WS convs stay importable from here
from lckd_kit.layers import InstanceNorm, WSConv2d, WSConv3d, conv, conv_norm_act, norm  # noqa: F401

N_MOD = len(MODALITIES)  # 4 modalities, one shared encoder
N_OUT = len(REGIONS)  # 3 sigmoid outputs: ET, TC, WT


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ModelConfig:
    """Everything that shapes an :class:`LCKDNet`. Per-axis tuples are in kit layout (X, Y[, Z]).

    The encoder is stem (WS conv, ``stem_kernel``, ``stem_stride``) -> maxpool 3/2/1 -> 4 layers of
    Bottleneck blocks (``blocks[i]`` blocks of ``planes[i]`` planes, output ``planes[i]*expansion``,
    first block strided by ``layer_strides[i]`` with a projection shortcut) -> asppreduce 1x1 ->
    ASPP(``bottleneck_width``, ``aspp_dilations``). The decoder has one stage per encoder level with
    ``decoder_widths`` (deepest first). Logits are upsampled by ``output_upsample`` (= the stem stride).

    The last three fields are the model's input contract, recorded by training and stored in every
    checkpoint, so inference can prepare any scan the way the training data was: ``roi_size`` the
    window it was trained on, ``spacing`` the voxel size (mm, X Y Z; None: unknown, never
    resampled) and ``normalization`` the intensity normalisation (``transforms.NORMALIZATIONS``).
    """

    name: str
    spatial_dims: int = 3
    stem_width: int = 64
    stem_kernel: int = 7
    stem_stride: tuple[int, ...] = (2, 2, 1)
    planes: tuple[int, int, int, int] = (64, 128, 256, 320)
    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    expansion: int = 4
    layer_strides: tuple[int, int, int, int] = (1, 2, 2, 2)
    bottleneck_width: int = 256
    aspp_dilations: tuple[int, int, int] = (2, 4, 8)
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 32)
    weight_std: bool = True
    negative_slope: float = 0.01
    roi_size: tuple[int, ...] = (160, 160, 80)
    spacing: tuple[float, float, float] | None = None
    normalization: str = "zscore"

    def __post_init__(self):
        d = self.spatial_dims
        if d not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {d}")
        for key in ("stem_stride", "roi_size"):
            if len(getattr(self, key)) != d:
                raise ValueError(f"{key} must have {d} entries, got {getattr(self, key)}")
        for key in ("planes", "blocks", "layer_strides", "decoder_widths"):
            if len(getattr(self, key)) != 4:
                raise ValueError(f"{key} must have 4 entries (one per level), got {getattr(self, key)}")
        if len(self.aspp_dilations) != 3:
            raise ValueError(f"aspp_dilations must have 3 entries, got {self.aspp_dilations}")
        if min(self.blocks) < 1:
            raise ValueError(f"every layer needs at least one block, got {self.blocks}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be 3 positive voxel sizes in mm (X, Y, Z), got {self.spacing}")

    @property
    def output_upsample(self) -> tuple[int, ...]:
        """Logit upsampling factor per axis: the decoder ends at stem resolution."""
        return tuple(self.stem_stride)

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Every input axis must be a multiple of this (stem x maxpool x layer strides)."""
        deep = 2 * math.prod(self.layer_strides)
        return tuple(s * deep for s in self.stem_stride)


CONFIGS: dict[str, ModelConfig] = {
    # The reference DualNet (ResNet-50 encoder with layer4 of 320 planes, ASPP, 4-level decoder),
    # in kit layout: 43,656,672 parameters.
    "paper": ModelConfig(name="paper"),
    # CPU-sized 3-D variant for 2 mm phantoms: isotropic stem stride, total stride 16 so a 64^3
    # crop still has a 4^3 bottleneck, ASPP dilations scaled to that grid.
    "small": ModelConfig(
        name="small", spatial_dims=3, stem_width=16, stem_kernel=3, stem_stride=(2, 2, 2),
        planes=(8, 16, 32, 48), blocks=(1, 1, 1, 1), layer_strides=(1, 2, 2, 1),
        bottleneck_width=64, aspp_dilations=(1, 2, 3), decoder_widths=(64, 32, 16, 16),
        roi_size=(64, 64, 64)),
    # 2-D variant on axial slices (X, Y): full-resolution stem (2-D is cheap), total stride 16,
    # trained on 64x64 crops (TRAIN_CONFIGS["small2d"]).
    "small2d": ModelConfig(
        name="small2d", spatial_dims=2, stem_width=16, stem_kernel=3, stem_stride=(1, 1),
        planes=(8, 16, 32, 48), blocks=(1, 2, 2, 1), layer_strides=(1, 2, 2, 2),
        bottleneck_width=64, aspp_dilations=(1, 2, 3), decoder_widths=(64, 32, 16, 16),
        roi_size=(64, 64)),
}


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """A plain JSON-able dict (tuples become lists) to store next to a checkpoint."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_dict(d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`; unknown keys raise ``ValueError``."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def build_model(config: str | ModelConfig | Mapping[str, Any] = "small") -> "LCKDNet":
    """``build_model("paper" | "small" | "small2d" | ModelConfig | dict)``."""
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown model config {config!r}; choose one of {sorted(CONFIGS)}")
        config = CONFIGS[config]
    elif isinstance(config, Mapping):
        config = config_from_dict(config)
    return LCKDNet(config)


def parameter_count(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------
# dimension-generic building blocks (made of the layers in lckd_kit.layers)


class Bottleneck(nn.Module):
    """1x1 -> 3^d (carries the stride) -> 1x1 (x expansion), IN after each, residual, LeakyReLU.
    (B, cin, *s) -> (B, planes*expansion, *s/stride)."""

    def __init__(self, cfg: ModelConfig, cin: int, planes: int, stride: int, project: bool):
        super().__init__()
        cout = planes * cfg.expansion
        self.slope = cfg.negative_slope
        self.conv1, self.norm1 = conv(cfg, cin, planes, 1), norm(cfg, planes)
        self.conv2, self.norm2 = conv(cfg, planes, planes, 3, stride=stride, padding=1), norm(cfg, planes)
        self.conv3, self.norm3 = conv(cfg, planes, cout, 1), norm(cfg, cout)
        # the reference gives the first block of EVERY layer a projection shortcut (even layer1, stride 1)
        self.downsample = nn.Sequential(conv(cfg, cin, cout, 1, stride=stride), norm(cfg, cout)) if project else None

    def forward(self, x):
        out = F.leaky_relu(self.norm1(self.conv1(x)), self.slope, inplace=True)
        out = F.leaky_relu(self.norm2(self.conv2(out)), self.slope, inplace=True)
        out = self.norm3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.leaky_relu(out + shortcut, self.slope, inplace=True)


class BasicBlock(nn.Module):
    """Decoder block: 3^d conv -> IN -> act -> 3^d conv -> IN, + input, act. Shape-preserving."""

    def __init__(self, cfg: ModelConfig, c: int):
        super().__init__()
        self.slope = cfg.negative_slope
        self.conv1, self.norm1 = conv(cfg, c, c, 3, padding=1), norm(cfg, c)
        self.conv2, self.norm2 = conv(cfg, c, c, 3, padding=1), norm(cfg, c)

    def forward(self, x):
        out = F.leaky_relu(self.norm1(self.conv1(x)), self.slope, inplace=True)
        out = self.norm2(self.conv2(out))
        return F.leaky_relu(out + x, self.slope, inplace=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3^d, a global branch; concat -> 1x1.
    (N, C, *b) -> (N, C, *b)."""

    def __init__(self, cfg: ModelConfig, c: int):
        super().__init__()
        d1, d2, d3 = cfg.aspp_dilations
        self.slope = cfg.negative_slope
        self.branch1 = conv_norm_act(cfg, c, c, 1)
        self.branch2 = conv_norm_act(cfg, c, c, 3, dilation=d1)
        self.branch3 = conv_norm_act(cfg, c, c, 3, dilation=d2)
        self.branch4 = conv_norm_act(cfg, c, c, 3, dilation=d3)
        # Global branch, kept for parameter/state_dict parity but never called: see forward.
        self.branch5_conv = conv(cfg, c, c, 1)
        self.branch5_norm = norm(cfg, c)
        self.conv_cat = conv_norm_act(cfg, 5 * c, c, 1)

    def global_branch(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *b) -> (N, C, *b) constant LeakyReLU(beta), beta = ``branch5_norm.bias``.

        The reference runs pool -> conv -> InstanceNorm on a 1-voxel map; IN turns that into exactly
        its bias beta, so the branch is this constant with zero gradient into ``branch5_conv`` (modern
        torch refuses that IN); we compute what the reference computed, directly. (conv_cat's
        InstanceNorm then removes this per-channel constant again: the branch has no effect at all.)"""
        glob = F.leaky_relu(self.branch5_norm.bias, self.slope).to(x.dtype)
        return glob.view(1, -1, *[1] * (x.dim() - 2)).expand(x.shape[0], -1, *x.shape[2:])

    def forward(self, x):
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        branches.append(self.global_branch(branches[0]))  # branches[0]: right shape and autocast dtype
        return self.conv_cat(torch.cat(branches, 1))


# ----------------------------------------------------------------------------------------------
# encoder and decoder


class Backbone(nn.Module):
    """ResNet-style trunk on ONE modality: (N, 1, *S) -> [stem (N, w0, *S/stem), layer1..layer4]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.slope = cfg.negative_slope
        k = cfg.stem_kernel
        self.conv1 = conv(cfg, 1, cfg.stem_width, k, stride=tuple(cfg.stem_stride), padding=k // 2)
        self.norm1 = norm(cfg, cfg.stem_width)
        self.maxpool = Pool[Pool.MAX, cfg.spatial_dims](3, stride=2, padding=1)
        cin, layers = cfg.stem_width, []
        for planes, n, stride in zip(cfg.planes, cfg.blocks, cfg.layer_strides):
            blocks = [Bottleneck(cfg, cin, planes, stride, project=True)]
            cin = planes * cfg.expansion
            blocks += [Bottleneck(cfg, cin, planes, 1, project=False) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x) -> list[torch.Tensor]:
        x = F.leaky_relu(self.norm1(self.conv1(x)), self.slope, inplace=True)
        maps = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        return maps


class SharedEncoder(nn.Module):
    """The one encoder every modality goes through.
    (N, 1, *S) -> bottleneck (N, C, *S/divisor), skips [stem, layer1, layer2, layer3]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = Backbone(cfg)
        self.asppreduce = conv_norm_act(cfg, cfg.planes[3] * cfg.expansion, cfg.bottleneck_width, 1)
        self.aspp = ASPP(cfg, cfg.bottleneck_width)

    def forward(self, x) -> tuple[torch.Tensor, list[torch.Tensor]]:
        maps = self.backbone(x)
        return self.aspp(self.asppreduce(maps[-1])), maps[:-1]


class Decoder(nn.Module):
    """(B, 4C, *b) fused bottleneck + 4 concatenated skips (B, 4c_i, *s_i) -> logits at stem resolution.

    Stage i (3 = deepest): ConvTranspose up -> + shortcut_conv_i(skip_i) (1x1 WS conv+IN+act, ADDED)
    -> BasicBlock. Then a plain bias-free 1x1 ``cls_conv`` to 3 channels.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        convT = Conv[Conv.CONVTRANS, cfg.spatial_dims]
        skip_widths = [cfg.stem_width] + [p * cfg.expansion for p in cfg.planes[:3]]
        # upsampling factor from level i+1 to level i (level 0 = stem, before the maxpool)
        factors = [2 * cfg.layer_strides[0], *cfg.layer_strides[1:]]
        cin = N_MOD * cfg.bottleneck_width
        for i, w in zip((3, 2, 1, 0), cfg.decoder_widths):
            f = factors[i]
            setattr(self, f"transposeconv_stage{i}", convT(cin, w, kernel_size=f, stride=f, bias=False))
            setattr(self, f"shortcut_conv{i}", conv_norm_act(cfg, N_MOD * skip_widths[i], w, 1))
            setattr(self, f"stage{i}_de", BasicBlock(cfg, w))
            cin = w
        self.cls_conv = Conv[Conv.CONV, cfg.spatial_dims](cin, N_OUT, 1, bias=False)

    def forward(self, x, skips: Sequence[torch.Tensor], projected: bool = False) -> torch.Tensor:
        """``projected=True``: ``skips[i]`` already hold shortcut_conv_i's convolution output
        (B, w_i, *s_i) (``LCKDNet.decode_many``); only its norm and activation are applied here."""
        for i in (3, 2, 1, 0):
            x = getattr(self, f"transposeconv_stage{i}")(x)
            shortcut = getattr(self, f"shortcut_conv{i}")
            x = x + (shortcut[2](shortcut[1](skips[i])) if projected else shortcut(skips[i]))
            x = getattr(self, f"stage{i}_de")(x)
        return self.cls_conv(x)

    def project_skips(self, skips: Sequence[torch.Tensor], zero_skips: Sequence[torch.Tensor]):
        """Each shortcut conv is linear in its four modality blocks: conv([s_1..s_4]) = sum_m W_m s_m.
        Apply each block once, so that any subset's shortcut input is a sum of four of these maps
        instead of a fresh conv over 4c_i channels. skips (B, 4, c_i, *s_i), zero_skips (c_i, *s_i)
        -> [(B, 4, w_i, *s_i)] per modality, [(4, w_i, *s_i)] for the zero input."""
        ys, zs = [], []
        for i, (s, z) in enumerate(zip(skips, zero_skips)):
            conv = getattr(self, f"shortcut_conv{i}")[0]
            w = conv.effective_weight() if hasattr(conv, "effective_weight") else conv.weight
            w_out, c = w.shape[0], w.shape[1] // N_MOD
            blocks = w.unflatten(1, (N_MOD, c)).transpose(0, 1).flatten(0, 1)  # (4 w_out, c, 1..): block m
            conv_nd = F.conv3d if s.dim() == 6 else F.conv2d
            ys.append(conv_nd(s.flatten(1, 2), blocks, groups=N_MOD).unflatten(1, (N_MOD, w_out)))
            zs.append(conv_nd(z[None], blocks)[0].unflatten(0, (N_MOD, w_out)))
        return ys, zs


# ----------------------------------------------------------------------------------------------
# the network


@dataclass
class Encoding:
    """All four modalities of a batch encoded once, plus the zero-input response.

    bottleneck: (B, 4, C, *b)  per-modality bottleneck features (ASPP output)
    skips:      4 tensors (B, 4, c_i, *s_i)  stem, layer1, layer2, layer3
    zero_bottleneck: (C, *b), zero_skips: 4 tensors (c_i, *s_i)  response to an all-zero volume
    """

    bottleneck: torch.Tensor
    skips: list[torch.Tensor]
    zero_bottleneck: torch.Tensor
    zero_skips: list[torch.Tensor]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


class LCKDNet(nn.Module):
    """LCKD: one shared encoder for all modalities, mean-filled bottleneck, U-Net decoder.

    ``logits, features = model(images, available)``; see the module docstring for the data flow.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = SharedEncoder(config)
        self.decoder = Decoder(config)
        for m in self.modules():  # reference init (WS convs are scale-invariant, so it matters little)
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
        self._zero_cache: tuple | None = None

    # -- input checking ------------------------------------------------------------------------

    @property
    def size_divisor(self) -> tuple[int, ...]:
        return self.config.size_divisor

    def check_input(self, images: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``images`` is (B, 4, *S) with S fitting the strides."""
        d = self.config.spatial_dims
        if images.dim() != d + 2 or images.shape[1] != N_MOD:
            raise ValueError(f"expected images of shape (B, {N_MOD}, {', '.join('XYZ'[:d])}) for config "
                             f"{self.config.name!r}, got {tuple(images.shape)}")
        spatial, div = tuple(images.shape[2:]), self.size_divisor
        if any(s % q for s, q in zip(spatial, div)):
            raise ValueError(f"spatial size {spatial} must be divisible by {div} for config {self.config.name!r}"
                             f" (pad or crop the input)")
        if math.prod(s // q for s, q in zip(spatial, div)) < 2:
            raise ValueError(f"spatial size {spatial} is too small for config {self.config.name!r}: the "
                             f"bottleneck would be a single voxel (InstanceNorm needs more); use >= 2x{div}")

    def availability(self, available, batch: int) -> torch.Tensor:
        """A bool mask ``(4,)`` (shared by the batch) or ``(B, 4)`` -> ``(B, 4)`` bool tensor on the CPU.

        Tensors, numpy arrays and sequences of bools are accepted; names ("flair+t1ce") and indices
        are not: turn them into a mask with :func:`lckd_kit.as_mask` first."""
        try:
            m = available.detach().cpu() if torch.is_tensor(available) else torch.as_tensor(np.asarray(available))
        except (TypeError, ValueError, RuntimeError):
            m = None
        if m is None or m.dtype != torch.bool or m.dim() not in (1, 2) or m.shape[-1] != N_MOD:
            raise ValueError(f"availability must be a bool mask of shape (4,) or (B, 4), got {available!r}; "
                             f"lckd_kit.as_mask turns names or indices into one")
        if m.dim() == 2 and m.shape[0] != batch:
            raise ValueError(f"availability has {m.shape[0]} rows for a batch of {batch}")
        m = m.expand(batch, N_MOD)
        if not m.any(1).all():
            raise NoModalityError("a sample has no available modality: at least one of flair, t1, t1ce, t2 is needed")
        return m

    def _mask_tensor(self, available, batch: int, device) -> torch.Tensor:
        """(B, 4) bool on ``device``. A tensor already on a non-CPU device is used as is (no sync, so
        no check that each row has an available modality)."""
        if torch.is_tensor(available) and available.device.type != "cpu":
            if available.shape[-1] != N_MOD or available.dim() not in (1, 2) or available.dtype != torch.bool:
                raise ValueError(f"availability must be a bool mask (4,) or (B, 4), got {tuple(available.shape)}")
            return available.to(device=device).expand(batch, N_MOD)
        return self.availability(available, batch).to(device)

    # -- encoder side --------------------------------------------------------------------------

    def _param_version(self) -> int:
        return sum(p._version for p in self.parameters())

    def zero_response(self, spatial: Sequence[int], like: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder response to one all-zero volume of size ``spatial``: ((C, *b), [(c_i, *s_i)]).
        Cached in eval mode without grad (it only depends on the weights and the shape)."""
        use_cache = not self.training and not torch.is_grad_enabled()
        key = (tuple(spatial), like.device, like.dtype, _autocast_on(like.device.type),
               self._param_version())
        if use_cache and self._zero_cache is not None and self._zero_cache[0] == key:
            return self._zero_cache[1]
        bott, skips = self.encoder(like.new_zeros((1, 1, *spatial)))
        out = (bott[0], [s[0] for s in skips])
        if use_cache:
            self._zero_cache = (key, out)
        return out

    def encode(self, images: torch.Tensor) -> Encoding:
        """Encode all four modalities of every sample once (+ the zero response). (B, 4, *S) -> Encoding."""
        self.check_input(images)
        B, spatial = images.shape[0], images.shape[2:]
        x = images.reshape(B * N_MOD, 1, *spatial)
        cached = not self.training and not torch.is_grad_enabled()
        if cached:
            bott, skips = self.encoder(x)
            zb, zs = self.zero_response(spatial, images)
        else:  # one encoder call, the zero volume as an extra sample
            bott, skips = self.encoder(torch.cat([x, x.new_zeros((1, 1, *spatial))]))
            zb, zs = bott[-1], [s[-1] for s in skips]
            bott, skips = bott[:-1], [s[:-1] for s in skips]
        return Encoding(bott.unflatten(0, (B, N_MOD)), [s.unflatten(0, (B, N_MOD)) for s in skips], zb, zs)

    def _encode_available(self, images, rows):
        """Encode only the available (sample, modality) volumes + one zero volume, then scatter the
        results to (B, 4, ...) slots; a missing slot gets the zero response. Exactly the reference's
        all-slot encoding, at the cost of (available + 1) volumes instead of 4B."""
        B, spatial = images.shape[0], images.shape[2:]
        flat = [b * N_MOD + m for b in range(B) for m in range(N_MOD) if rows[b][m]]
        x = images.reshape(B * N_MOD, 1, *spatial)
        if len(flat) == B * N_MOD:  # nothing missing: no zero volume, no gather
            bott, skips = self.encoder(x)
            return bott.unflatten(0, (B, N_MOD)), [s.unflatten(0, (B, N_MOD)) for s in skips]
        P = len(flat)
        if P + 1 >= B * N_MOD and (self.training or torch.is_grad_enabled()):
            # one slot missing: sharing would encode as many volumes as the reference and add a
            # gather of every skip map, so zero that slot in place instead (benchmarks: k=3, B=1)
            return self._encode_naive(images, torch.tensor(rows, dtype=torch.bool, device=images.device))
        x = x.index_select(0, torch.tensor(flat, device=x.device))
        if not self.training and not torch.is_grad_enabled():
            bott, skips = self.encoder(x)
            zb, zs = self.zero_response(spatial, images)
            bott = torch.cat([bott, zb[None]])
            skips = [torch.cat([s, z[None]]) for s, z in zip(skips, zs)]
        else:
            bott, skips = self.encoder(torch.cat([x, x.new_zeros((1, 1, *spatial))]))
        # row of the encoded batch feeding each (b, m) slot; P = the zero volume
        slot, r = [], 0
        for b in range(B):
            for m in range(N_MOD):
                slot.append(r if rows[b][m] else P)
                r += bool(rows[b][m])
        slot = torch.tensor(slot, device=x.device)
        gather = lambda t: t.index_select(0, slot).unflatten(0, (B, N_MOD))  # noqa: E731
        return gather(bott), [gather(s) for s in skips]

    def _encode_naive(self, images, mask):
        """The reference: zero the missing inputs and encode all 4B volumes."""
        B, spatial = images.shape[0], images.shape[2:]
        x = torch.where(mask.view(B, N_MOD, *[1] * len(spatial)), images, 0.0)  # where, not *: NaN-safe
        bott, skips = self.encoder(x.reshape(B * N_MOD, 1, *spatial))
        return bott.unflatten(0, (B, N_MOD)), [s.unflatten(0, (B, N_MOD)) for s in skips]

    # -- fusion and decoder ----------------------------------------------------------------------

    def _fuse_decode(self, feats: torch.Tensor, skips: Sequence[torch.Tensor], mask: torch.Tensor,
                     projected: bool = False) -> torch.Tensor:
        """feats (B, 4, C, *b) + skips (B, 4, c_i, *s_i) whose missing slots are final -> logits (B, 3, *S).
        ``projected``: skips are (B, w_i, *s_i) shortcut-conv outputs (see ``Decoder.project_skips``)."""
        B = feats.shape[0]
        m = mask.view(B, N_MOD, *[1] * (feats.dim() - 2))
        n_avail = m.sum(1, keepdim=True).clamp_min(1).to(feats.dtype)
        fill = torch.where(m, feats, 0.0).sum(1, keepdim=True) / n_avail  # mean of the available ones
        fused = torch.where(m, feats, fill).flatten(1, 2)  # (B, 4C, *b), modality-major channel blocks
        logits = self.decoder(fused, skips if projected else [s.flatten(1, 2) for s in skips], projected)
        if any(f != 1 for f in self.config.output_upsample):
            size = [n * f for n, f in zip(logits.shape[2:], self.config.output_upsample)]
            mode = "trilinear" if self.config.spatial_dims == 3 else "bilinear"
            logits = F.interpolate(logits, size=size, mode=mode, align_corners=False)
        return logits

    def decode(self, enc: Encoding, available) -> torch.Tensor:
        """Logits (B, 3, *S) for one modality subset from an :class:`Encoding`; equals ``forward``."""
        B = enc.bottleneck.shape[0]
        mask = self._mask_tensor(available, B, enc.bottleneck.device)
        skips = [torch.where(mask.view(B, N_MOD, *[1] * (s.dim() - 2)), s, z) for s, z in zip(enc.skips, enc.zero_skips)]
        return self._fuse_decode(enc.bottleneck, skips, mask)

    def decode_many(self, enc: Encoding, masks: Sequence, chunk: int | None = None) -> torch.Tensor:
        """Logits ``(n, B, 3, *S)`` for ``n`` subsets (each a (4,) mask) from one Encoding; equals
        ``decode`` per subset to float tolerance. Two savings over ``n`` decode calls:

        - the decoder's shortcut convs are applied to each modality's skip maps once
          (``Decoder.project_skips``), not once per subset (paper: 17 % of a decode's FLOPs);
        - ``chunk`` subsets (default all) share one decoder call on a batch of chunk*B, which uses
          the CPU better when the decoder's tensors are small, at chunk times the activation memory
          (``inference.predict_subsets`` picks it; benchmarks/run.py, decode what-if)."""
        n, B = len(masks), enc.bottleneck.shape[0]
        dev = enc.bottleneck.device
        all_m = torch.stack([self._mask_tensor(a, 1, dev)[0] for a in masks])  # (n, 4)
        ys, zs = self.decoder.project_skips(enc.skips, enc.zero_skips)
        chunk = max(1, int(chunk or n))
        rep = lambda t, k: t.unsqueeze(0).expand(k, *t.shape).flatten(0, 1)  # noqa: E731  (B, ...) -> (kB, ...)
        outs = []
        for start in range(0, n, chunk):
            sub = all_m[start:start + chunk]
            k = sub.shape[0]
            pre = []  # each subset's shortcut input: the sum of its four blocks, zero response where missing
            for y, z in zip(ys, zs):
                avail = lambda j: sub[:, j].view(k, *[1] * (y.dim() - 1))  # noqa: E731  (k, 1, 1, 1, ...)
                acc = sum(torch.where(avail(j), y[:, j].unsqueeze(0), z[j]) for j in range(N_MOD))
                pre.append(acc.flatten(0, 1))  # (kB, w_i, *s_i)
            m = sub.repeat_interleave(B, 0)
            outs.append(self._fuse_decode(rep(enc.bottleneck, k), pre, m, projected=True).unflatten(0, (k, B)))
        return torch.cat(outs)

    def forward(self, images: torch.Tensor, available, naive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 4, *S), available (4,) or (B, 4) -> (logits (B, 3, *S) in ET, TC, WT order,
        features (B, 4, C, *b) per-modality bottleneck features BEFORE mean filling; a missing slot
        holds the response to an all-zero input, as the reference's). The content of a missing
        modality's channel is never read. ``naive=True`` runs the reference's all-slot encoding.

        ``available`` is read on the host (a device tensor costs one sync); under torch.compile each
        distinct availability pattern is its own graph (at most 15 for batch-shared subsets)."""
        self.check_input(images)
        B = images.shape[0]
        cpu_mask = self.availability(available, B)
        mask = cpu_mask.to(images.device)
        if naive:
            feats, skips = self._encode_naive(images, mask)
        else:
            feats, skips = self._encode_available(images, cpu_mask.tolist())
        return self._fuse_decode(feats, skips, mask), feats

    # -- cache invalidation and reference weights -------------------------------------------------

    def train(self, mode: bool = True):
        self._zero_cache = None
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), .cuda() ...
        self._zero_cache = None
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._zero_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


__all__ = ["ModelConfig", "CONFIGS", "build_model", "config_to_dict", "config_from_dict", "parameter_count",
           "LCKDNet", "Encoding"]
