"""Intensity normalisation and the MONAI training / validation pipelines.

Images are ``(4, X, Y, Z)`` float32, region masks ``(3, X, Y, Z)`` uint8 (ET, TC, WT). Put
``data.LoadCased()`` in front of a pipeline to feed it ``{"case": Case}`` dicts.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    Lambdad,
    MapTransform,
    MaskIntensityd,
    NormalizeIntensity,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasField,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmooth,
    Randomizable,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensity,
    RandShiftIntensityd,
    RandSimulateLowResolution,
    RandZoomd,
    SpatialPadd,
    SqueezeDimd,
)

#: intensity normalisations a model can be trained with (stored in its config)
NORMALIZATIONS = ("zscore", "clip_zscore")

_zscore = NormalizeIntensity(nonzero=True, channel_wise=True, dtype=np.float32)


def clip_upper_tail(channel: np.ndarray, min_count: int = 50) -> np.ndarray:
    """The reference's tail clip of one modality: intensities above the last histogram bin that
    holds at least ``min_count`` voxels are set to that bin's lower edge.

    The histogram has one bin per intensity unit (as the reference's ``bins=int(max)`` on scans
    whose background is 0), capped at 65536 bins. The reference then uses the bin *index* as the
    intensity, which only equals the edge when the minimum is 0; we use the edge itself.
    """
    lo, hi = float(channel.min()), float(channel.max())
    if hi <= lo:
        return channel
    counts, edges = np.histogram(channel, bins=int(np.clip(hi - lo, 1, 65536)), range=(lo, hi))
    full = np.nonzero(counts >= min_count)[0]
    if len(full) == 0:
        return channel
    return np.minimum(channel, np.float32(edges[full[-1]]))


def normalize_image(image, method: str = "zscore"):
    """Per-modality normalisation over the brain (non-zero voxels); background stays exactly 0.

    ``method``: ``"zscore"`` (mean 0, std 1 over the brain) or ``"clip_zscore"`` (the reference:
    :func:`clip_upper_tail` first, then the z-score). ``image``: ``(4, *S)`` numpy array or torch
    tensor; returns the same type, float32. An all-zero channel (a missing modality) stays zero.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    tensor = torch.is_tensor(image)
    x = image.detach().cpu().numpy() if tensor else np.asarray(image)
    x = np.array(x, dtype=np.float32)  # a copy: MONAI's NormalizeIntensity works in place
    if method == "clip_zscore":
        for m in range(x.shape[0]):
            brain = x[m] != 0
            x[m] = np.where(brain, clip_upper_tail(x[m]), 0.0)
    out = np.asarray(_zscore(x), dtype=np.float32)
    if not np.isfinite(out).all():  # e.g. intensities so large that float32 statistics overflow
        from lckd_kit import MODALITIES

        bad = [m for m in range(out.shape[0]) if not np.isfinite(out[m]).all()]
        names = ", ".join(MODALITIES[m] if out.shape[0] == len(MODALITIES) else f"channel {m}" for m in bad)
        original = image.detach().cpu().numpy() if tensor else np.asarray(image)  # x was z-scored in place
        peak = max(float(np.abs(original[m]).max()) for m in bad)
        raise ValueError(f"normalising {names} gave non-finite values (intensities up to {peak:.3g}); the image's "
                         f"scaling is wrong: fix the file's header (scl_slope) or rescale the image")
    return torch.from_numpy(out) if tensor else out


# --------------------------------------------------------------------------------------------
# the grid a model was trained on


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis of a ``(4, 4)`` affine."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0))


class Resampling:
    """The map between a case's voxel grid and the grid a model works on (voxels of ``spacing`` mm).

    ``to_model`` resamples images (MONAI ``Spacing``), smoothing first where voxels get larger so a
    1 mm scan at 2 mm looks like a 2 mm acquisition (the Gaussian that turns the source resolution
    into the target's), and keeps the background exactly 0 (the skull-stripped brain stays the
    non-zero voxels). ``to_case`` resamples model-grid maps (probabilities) back onto the case's own
    grid and affine (MONAI ``SpatialResample``), so they overlay the input exactly.

    Args:
        affine: the case's ``(4, 4)`` affine (RAS, as ``data.load_case`` returns it).
        shape: the case's spatial shape ``(X, Y, Z)``.
        spacing: the model's voxel size in mm.
    """

    def __init__(self, affine, shape: Sequence[int], spacing: Sequence[float]):
        from monai.data import MetaTensor
        from monai.transforms import Spacing

        self.src_affine = torch.as_tensor(np.asarray(affine, np.float64))
        self.src_shape = tuple(int(s) for s in shape)
        self.src_spacing = spacing_of(affine)
        self.spacing = tuple(float(s) for s in spacing)
        probe = Spacing(pixdim=self.spacing)(MetaTensor(torch.zeros((1, *self.src_shape)), affine=self.src_affine))
        self.dst_affine = probe.affine.clone()
        self.dst_shape = tuple(int(s) for s in probe.shape[1:])

    @property
    def factors(self) -> tuple[float, ...]:
        """Target / source voxel size per axis (2.0: the model sees voxels twice as large)."""
        return tuple(t / s for t, s in zip(self.spacing, self.src_spacing))

    def to_model(self, image, mode: str = "bilinear") -> torch.Tensor:
        """``(C, X, Y, Z)`` on the case grid -> ``(C, *dst_shape)`` float32 on the model grid.
        ``mode="nearest"`` for label maps (no smoothing)."""
        from monai.data import MetaTensor
        from monai.transforms import GaussianSmooth, Spacing

        x = torch.as_tensor(np.asarray(image), dtype=torch.float32)
        brain = (x != 0).any(0, keepdim=True).float()
        if mode != "nearest":
            # Gaussian of FWHM sqrt(target^2 - source^2) mm, in source voxels, along axes that coarsen
            sigma = [float(np.sqrt(max(t * t - s * s, 0.0)) / 2.3548 / s) for t, s in zip(self.spacing, self.src_spacing)]
            if max(sigma) > 0:
                x = GaussianSmooth(sigma=sigma)(x)
                x = x.as_tensor() if hasattr(x, "as_tensor") else x
        out = Spacing(pixdim=self.spacing, mode=mode)(MetaTensor(x, affine=self.src_affine)).as_tensor()
        if mode != "nearest":
            inside = Spacing(pixdim=self.spacing, mode="nearest")(MetaTensor(brain, affine=self.src_affine)).as_tensor()
            out = out * (inside > 0)
        return out.float()

    def to_case(self, maps) -> torch.Tensor:
        """``(C, *dst_shape)`` on the model grid -> ``(C, X, Y, Z)`` float32 on the case grid (bilinear)."""
        from monai.data import MetaTensor
        from monai.transforms import SpatialResample

        m = MetaTensor(torch.as_tensor(maps, dtype=torch.float32), affine=self.dst_affine)
        out = SpatialResample(mode="bilinear", padding_mode="zeros")(m, dst_affine=self.src_affine,
                                                                       spatial_size=self.src_shape)
        return out.as_tensor().float()


def resampling_for(affine, shape: Sequence[int], spacing: Sequence[float] | None, tolerance: float = 0.01):
    """A :class:`Resampling` to ``spacing``, or None when the case is already at it (within
    ``tolerance``, relative) or the model's spacing is unknown."""
    if spacing is None or affine is None:
        return None
    if np.allclose(spacing_of(affine), spacing, rtol=tolerance, atol=0):
        return None
    return Resampling(affine, shape, spacing)


# --------------------------------------------------------------------------------------------
# training / validation pipelines


def _nonzero(x):
    # module-level (not a lambda) so pipelines pickle into DataLoader workers
    return x != 0


def _brain_of(image):
    """(C, *S) -> (1, *S) float mask of the voxels where any modality is non-zero."""
    return (image != 0).any(0, keepdim=True).float()


class NormalizeImaged(MapTransform):
    """Dict transform of :func:`normalize_image` (``method``: one of :data:`NORMALIZATIONS`)."""

    def __init__(self, keys: KeysCollection = "image", method: str = "zscore"):
        super().__init__(keys)
        if method not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
        self.method = method

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = normalize_image(d[key], self.method)
        return d


def _roi(roi_size: Sequence[int] | int, spatial_dims: int) -> tuple[int, int, int]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    roi = (roi_size,) * spatial_dims if isinstance(roi_size, int) else tuple(int(r) for r in roi_size)
    if len(roi) != spatial_dims or min(roi) < 1:
        raise ValueError(f"roi_size must hold {spatial_dims} positive sizes, got {roi_size}")
    return roi if spatial_dims == 3 else (roi[0], roi[1], 1)  # 2-D: one axial slice


class PerChannelRandd(Randomizable, MapTransform):
    """Apply a random array transform to each channel on its own, as batchgenerators' ``p_per_channel``:
    with probability ``prob`` for a sample, then ``prob_per_channel`` for each channel.

    ``transform`` is an array transform that always applies when called (its own ``prob`` 1);
    each channel is given to it as ``(1, *S)``."""

    def __init__(self, keys: KeysCollection, transform, prob: float, prob_per_channel: float = 0.5):
        MapTransform.__init__(self, keys)
        self.transform, self.prob, self.prob_per_channel = transform, float(prob), float(prob_per_channel)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed=int(self.R.randint(2**31)))
        return self

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, data):
        d = dict(data)
        if self.R.rand() >= self.prob:
            return d
        for key in self.key_iterator(d):
            x = d[key]
            chans = []
            for c in range(x.shape[0]):
                ch = x[c:c + 1]
                if self.R.rand() < self.prob_per_channel:
                    ch = self.transform(ch)
                    ch = ch.as_tensor() if hasattr(ch, "as_tensor") else ch
                chans.append(torch.as_tensor(ch))
            d[key] = torch.cat(chans)
        return d


#: the augmentation recipes a TrainConfig can name (``augment``); see :func:`augmentations`
AUGMENTATIONS = ("none", "light", "reference", "scanner")


def augmentations(kind: str, spatial_dims: int) -> list:
    """The random training augmentations applied to each crop, after cropping.

    ``"light"``: a 50 % flip per axis, intensity scale/shift ±0.1 (p 0.15 each), Gaussian noise σ 0.1
    (p 0.1). ``"reference"``: the reference's distribution (its ``BraTSDataSet.py`` crop rescale and
    flips plus the batchgenerators pipeline of its ``my_collate``), built from MONAI transforms;
    every probability and range is in docs/augmentation.md and pinned by tests. ``"scanner"``:
    ``"reference"`` plus a smooth multiplicative bias field (p 0.3), what scans from other scanners
    differ by most -- for models that must meet real scans. ``"none"``: nothing.

    The image, the label and a brain mask move together; intensity changes are confined to the
    brain afterwards, so the background and a missing modality stay exactly 0, and labels are
    resampled nearest-neighbour with 0 outside (the reference's -1 border labels are a defect).
    2-D crops get the in-plane analogue of each spatial transform.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {kind!r}")
    img, spatial_keys = "image", ("image", "label", "brain")
    interp = ("bilinear", "nearest", "nearest")
    flips = [RandFlipd(keys=spatial_keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    if kind == "none":
        return []
    if kind == "light":
        return flips + [
            RandScaleIntensityd(keys=img, factors=0.1, prob=0.15, channel_wise=True),
            RandShiftIntensityd(keys=img, offsets=0.1, prob=0.15, channel_wise=True),
            RandGaussianNoised(keys=img, prob=0.1, mean=0.0, std=0.1, sample_std=False),
        ]
    angle = np.deg2rad(15.0)
    if spatial_dims == 3:
        elastic = Rand3DElasticd(keys=spatial_keys, prob=0.2, sigma_range=(9.0, 13.0), magnitude_range=(0.0, 900.0),
                                 mode=interp, padding_mode="zeros")
    else:  # the same displacement field statistics on the slice
        elastic = Rand2DElasticd(keys=spatial_keys, prob=0.2, spacing=(9.0, 9.0), magnitude_range=(0.0, 1.0),
                                 mode=interp, padding_mode="zeros")
    out = [
        # the reference's crop of 0.9-1.1x the crop size resized back (p 0.5): content zoomed 1/s
        RandZoomd(keys=spatial_keys, prob=0.5, min_zoom=1 / 1.1, max_zoom=1 / 0.9, keep_size=True, mode=interp,
                  padding_mode="constant"),
        # its 8-way flip then batchgenerators' 50 % mirror per axis: together a fair flip per axis
        *flips,
        elastic,
        RandAffined(keys=spatial_keys, prob=0.2, rotate_range=(angle,) * (3 if spatial_dims == 3 else 1), mode=interp,
                    padding_mode="zeros"),
        # batchgenerators scales coordinates by s in (0.85, 1.25), the same for every axis: zoom 1/s
        RandZoomd(keys=spatial_keys, prob=0.2, min_zoom=1 / 1.25, max_zoom=1 / 0.85, keep_size=True, mode=interp,
                  padding_mode="constant"),
        RandGaussianNoised(keys=img, prob=0.1, mean=0.0, std=0.1, sample_std=True),  # its sigma ~ U(0, 0.1)
        PerChannelRandd(img, RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=1.0),
                        prob=0.2, prob_per_channel=0.5),
        RandScaleIntensityd(keys=img, factors=0.25, prob=0.15, channel_wise=True),  # brightness x(0.75, 1.25)
        PerChannelRandd(img, RandShiftIntensity(offsets=0.1 * np.sqrt(3.0), prob=1.0), prob=0.15,
                        prob_per_channel=0.5),  # additive brightness: a uniform shift of sd 0.1
        RandScaleIntensityFixedMeand(keys=img, factors=0.25, fixed_mean=True, preserve_range=True, prob=0.15,
                                     channel_wise=True),  # contrast (0.75, 1.25), range preserved
        PerChannelRandd(img, RandSimulateLowResolution(
            zoom_range=(0.5, 1.0), prob=1.0, upsample_mode="trilinear" if spatial_dims == 3 else "bilinear"),
            prob=0.25, prob_per_channel=0.5),
        RandAdjustContrastd(keys=img, gamma=(0.7, 1.5), retain_stats=True, prob=0.15),
    ]
    if kind == "scanner":
        out.append(PerChannelRandd(img, RandBiasField(coeff_range=(0.0, 0.3), prob=1.0), prob=0.3,
                                   prob_per_channel=1.0))
    return out


def train_transforms(
    roi_size: Sequence[int] | int,
    spatial_dims: int = 3,
    num_samples: int = 1,
    pos_fraction: float = 0.375,
    augment: str = "light",
    normalization: str = "zscore",
) -> Compose:
    """Training pipeline on dicts with ``"image"`` (4, X, Y, Z) raw and ``"label"`` (3, X, Y, Z).

    Output samples (a list of ``num_samples`` dicts per input): ``"image"`` float32 tensor
    ``(4, *roi)`` and ``"label"`` uint8 tensor ``(3, *roi)``; for ``spatial_dims=2`` axial slices
    ``(4, rx, ry)`` / ``(3, rx, ry)``. The ``"case"`` object is dropped so batches collate.

    Steps: pad to the roi; normalise each modality over the whole case's brain (statistics of the
    case, not of the crop, as the reference; :func:`normalize_image`); crop with ``pos_fraction`` of
    the crop centres on tumour (WT) voxels and the rest on tumour-free brain voxels. The reference
    centres a crop on a random ET/WT/TC voxel with probability 0.5 x 3/4 = 0.375 and otherwise crops
    at random, hence the default; unlike the reference, the other centres stay inside the brain so
    small crops and 2-D slices are not spent on air. Then :func:`augmentations` (``augment``), with
    the background and missing modalities kept exactly 0.

    Args:
        roi_size: crop size, ``spatial_dims`` values (an int means a cube / square).
        spatial_dims: 3 for 3-D patches, 2 for axial slices.
        num_samples: crops per case.
        pos_fraction: share of crops centred on tumour.
        augment: one of :data:`AUGMENTATIONS`.
        normalization: one of :data:`NORMALIZATIONS`.
    """
    crop = _roi(roi_size, spatial_dims)
    if not 0.0 <= pos_fraction <= 1.0:
        raise ValueError(f"pos_fraction must lie in [0, 1], got {pos_fraction}")
    keys = ("image", "label")
    steps: list = [
        DeleteItemsd(keys="case"),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.uint8, track_meta=False),
        SpatialPadd(keys=keys, spatial_size=crop),
        # Indices on the raw image (brain > 0) before z-scoring makes brain voxels negative.
        # MONAI treats channel 0 of a multi-channel label as background and takes the union of
        # the rest: with nested (ET, TC, WT) that union is WT, the whole tumour -- what we want.
        FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0),
        NormalizeImaged(keys="image", method=normalization),
        RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=crop, pos=pos_fraction, neg=1.0 - pos_fraction,
            num_samples=num_samples, fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices",
        ),
    ]
    if spatial_dims == 2:  # the crop is one axial slice: augment it as a 2-D image
        steps.append(SqueezeDimd(keys=keys, dim=-1))
    steps += [
        Lambdad(keys="image", func=_brain_of, overwrite="brain"),
        *augmentations(augment, spatial_dims),
        MaskIntensityd(keys="image", mask_key="brain", select_fn=_nonzero),
        DeleteItemsd(keys="brain"),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.uint8, track_meta=False),
    ]
    return Compose(steps)


def val_transforms(spatial_dims: int = 3, normalization: str = "zscore") -> Compose:
    """Validation pipeline: normalisation only, deterministic, whole volumes.

    Output ``"image"`` float32 tensor ``(4, X, Y, Z)``, ``"label"`` uint8 tensor ``(3, X, Y, Z)``
    (or ``None`` for unlabelled cases); other keys (affine, case, ...) pass through so
    predictions can be saved with :func:`save_prediction`. ``spatial_dims=2`` returns the same
    whole volumes: 2-D models are run slice by slice at inference.
    """
    _roi(1, spatial_dims)  # validates spatial_dims
    steps: list = [
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.uint8, track_meta=False, allow_missing_keys=True),
        NormalizeImaged(keys="image", method=normalization),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
    ]
    return Compose(steps)


__all__ = ["NORMALIZATIONS", "AUGMENTATIONS", "clip_upper_tail", "normalize_image", "NormalizeImaged", "spacing_of",
           "Resampling", "resampling_for", "PerChannelRandd", "augmentations", "train_transforms", "val_transforms"]
