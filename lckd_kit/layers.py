"""The layers LCKDNet's blocks are made of, for 2-D and 3-D alike: the weight-standardised
convolution, InstanceNorm (as a GroupNorm) and the conv / norm / conv-norm-act factories that pick
them from a :class:`lckd_kit.model.ModelConfig`."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv

if TYPE_CHECKING:  # only for the annotations: model imports this module
    from lckd_kit.model import ModelConfig


class _WeightStd:
    """Weight standardisation: each filter is made zero-mean and divided by sqrt(unbiased var + 1e-12)
    over (in, *k) before the convolution (as the reference ``Conv3d_wd``). Recomputed at every call:
    caching it for inference measured no gain (benchmarks/run.py, caches section)."""

    def effective_weight(self) -> torch.Tensor:
        flat = self.weight.flatten(1)
        flat = flat - flat.mean(1, keepdim=True)
        # the unbiased variance of the centred filter, as a sum of squares: cheaper than torch.var
        # on these shapes (benchmarks/run.py, profile section; docs/performance.md)
        var = flat.square().sum(1, keepdim=True) / (flat.shape[1] - 1)
        return (flat / torch.sqrt(var + 1e-12)).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class WSConv2d(_WeightStd, nn.Conv2d):
    pass


class WSConv3d(_WeightStd, nn.Conv3d):
    pass


_WS_CONV = {2: WSConv2d, 3: WSConv3d}


def conv(cfg: ModelConfig, cin: int, cout: int, k: int, stride=1, padding=0, dilation=1) -> nn.Module:
    """A bias-free (weight-standardised if ``cfg.weight_std``) convolution."""
    cls = _WS_CONV[cfg.spatial_dims] if cfg.weight_std else Conv[Conv.CONV, cfg.spatial_dims]
    return cls(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=False)


class InstanceNorm(nn.GroupNorm):
    """The reference's InstanceNorm (affine, no running stats: each sample's own statistics), as a
    GroupNorm with one channel per group. Same function, same ``weight``/``bias`` parameters and
    eps; torch's group-norm kernels are faster on the CPU (benchmarks/run.py, profile section,
    "torch InstanceNorm" what-if; docs/performance.md). Any spatial rank."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, num_features, eps=eps, affine=True)

    @property
    def num_features(self) -> int:
        return self.num_channels


def norm(cfg: ModelConfig, c: int) -> nn.Module:
    return InstanceNorm(c)


def conv_norm_act(cfg: ModelConfig, cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    """conv -> IN -> LeakyReLU; indices 0/1 match the reference's nn.Sequential names."""
    pad = dilation * (k // 2)
    return nn.Sequential(conv(cfg, cin, cout, k, padding=pad, dilation=dilation), norm(cfg, cout),
                         nn.LeakyReLU(cfg.negative_slope, inplace=True))


__all__ = ["WSConv2d", "WSConv3d", "InstanceNorm", "conv", "norm", "conv_norm_act"]
