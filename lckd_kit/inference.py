"""The one path from (model, image, modality subsets) to probabilities.

Teacher election, training-time validation, the 15-subset evaluation, ``lckd-kit predict`` and the
explorer all call :func:`predict_subsets`, with the same defaults, so every view of a model sees
the inputs it was trained on:

* the window is the model's trained window (``model.config.roi_size``, written into the model
  config by :func:`lckd_kit.train.train` and stored in its checkpoints): :func:`default_roi`;
* MONAI's ``sliding_window_inference`` tiles the image; each window is **encoded once** and every
  requested subset is decoded from that one encoding (the encoder is nearly all of the cost);
* probabilities (sigmoid) are averaged over overlapping windows, as the reference ``eval.py``;
* only the brain's bounding box is processed (``crop_foreground``); outside it the probability is 0.

2-D models run on volumes too: a window of ``k`` axial slices ``(b, 4, rx, ry, k)`` is folded into a
batch of ``b*k`` slices (:func:`fold_slices`) and unfolded after decoding (:func:`unfold_slices`).

Any model works that has ``config`` (``spatial_dims``, ``roi_size``, ``size_divisor``) and
``forward(images, available) -> (logits, features)``; ``encode``/``decode_many`` are used when
present (LCKD's shared encoder), otherwise each subset is one forward pass per window.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from lckd_kit import ALL_PRESENT, MODALITIES, as_mask, subset_name

N_MOD = len(MODALITIES)

#: axial slices per window when a 2-D model runs on a volume (a batching choice, not a model property)
SLICES_PER_WINDOW_2D = 16

#: :func:`predict_subsets` decodes a window's subsets with ``decode_many``, several per decoder
#: call: up to DECODE_BATCH_ITEMS volumes or slices per call for models smaller than
#: DECODE_BATCH_MAX_PARAMS parameters, DECODE_BATCH_ITEMS_LARGE for larger ones. Small decoders use
#: the CPU better in larger batches; a large decoder's activations make big batches slower
#: (benchmarks/run.py, decode what-if; figures in docs/performance.md).
DECODE_BATCH_MAX_PARAMS = 5_000_000
DECODE_BATCH_ITEMS = 16
DECODE_BATCH_ITEMS_LARGE = 2


def model_config(model: torch.nn.Module):
    """The model's config (also through DataParallel / DDP wrappers)."""
    return getattr(model, "config", None) or model.module.config


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def default_roi(model: torch.nn.Module, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """The model's trained window, shrunk to the image where the image is smaller.

    3-D models: ``model.config.roi_size``. 2-D models: ``(*roi_size, SLICES_PER_WINDOW_2D)``, the
    third entry being slices per window. A window larger than the image only adds zero padding, so
    each axis is capped at the image size rounded up to the model's size divisor.
    ``image_shape`` is ``(X, Y, Z)``.
    """
    cfg = model_config(model)
    two_d = cfg.spatial_dims == 2
    roi = (*cfg.roi_size, SLICES_PER_WINDOW_2D) if two_d else tuple(cfg.roi_size)
    div = (*cfg.size_divisor, 1) if two_d else tuple(cfg.size_divisor)
    return tuple(int(min(r, math.ceil(n / d) * d)) for r, n, d in zip(roi, image_shape, div))


def fold_slices(window: torch.Tensor) -> torch.Tensor:
    """A window of axial slices ``(b, C, rx, ry, k)`` -> a batch of 2-D slices ``(b*k, C, rx, ry)``."""
    b, c, rx, ry, k = window.shape
    return window.permute(0, 4, 1, 2, 3).reshape(b * k, c, rx, ry)


def unfold_slices(out: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of :func:`fold_slices` for any channel count: ``(b*k, C, rx, ry)`` -> ``(b, C, rx, ry, k)``."""
    bk, c, rx, ry = out.shape
    return out.reshape(b, bk // b, c, rx, ry).permute(0, 2, 3, 4, 1)


def blended_encoding(enc, available, blend: Sequence[float]):
    """An Encoding to decode with ALL modalities marked available (an exploration of the model).

    For a selected modality m the bottleneck becomes ``w_m·f_m + (1−w_m)·fill`` with its own skips;
    a deselected one gets ``fill`` and the zero-input skips, ``fill`` being the mean of the selected
    modalities' features (the model's own mean filling). With every weight 1 this is exactly what
    ``decode(enc, available)`` decodes.

    Args:
        enc: ``model.encode(images)``: bottleneck ``(B, 4, C, *b)``, skips ``(B, 4, c_i, *s_i)``.
        available: the selected subset, a (4,) bool mask.
        blend: ``(4,)`` weights in [0, 1], MODALITIES order (ignored for deselected modalities).
    """
    from lckd_kit.model import Encoding

    mask = as_mask(available)
    f = enc.bottleneck
    shape = (1, N_MOD) + (1,) * (f.dim() - 2)
    m = torch.tensor(mask, device=f.device).view(shape)
    w = torch.as_tensor(np.asarray(blend, dtype=np.float32), device=f.device).to(f.dtype).view(shape)
    # the same arithmetic as LCKDNet's fusion, so all-ones blends reproduce it bit for bit
    fill = torch.where(m, f, 0.0).sum(1, keepdim=True) / float(sum(mask))
    bottleneck = torch.where(m, w * f + (1 - w) * fill, fill)
    skips = [torch.where(m.view((1, N_MOD) + (1,) * (s.dim() - 2)), s, z) for s, z in zip(enc.skips, enc.zero_skips)]
    return Encoding(bottleneck, skips, enc.zero_bottleneck, enc.zero_skips)


def brain_box(image: torch.Tensor) -> tuple[slice, slice, slice] | None:
    """Bounding box of the non-zero voxels of a ``(4, X, Y, Z)`` image (None if all zero).

    Skull-stripped scans are exactly 0 outside the brain in every modality, and normalisation keeps
    it so; the four modalities share one brain mask, so the box does not depend on the subset."""
    nonzero = (image != 0).any(0)
    if not nonzero.any():
        return None
    idx = torch.nonzero(nonzero)
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0).values, idx.max(0).values))


def _window_predictor(model, masks: list[torch.Tensor], two_d: bool, device: torch.device, amp: bool,
                      decode_batch: int | None, blend, probs: bool, shared_encoder: bool):
    """window (b, 4, rx, ry, rz) -> (b, 3n, rx, ry, rz): every subset stacked along channels so MONAI
    stitches them in one buffer (subset-major channel blocks)."""
    small = sum(p.numel() for p in model.parameters()) < DECODE_BATCH_MAX_PARAMS

    def predictor(window: torch.Tensor) -> torch.Tensor:
        if hasattr(window, "as_tensor"):  # MONAI may hand MetaTensors; models want plain tensors
            window = window.as_tensor()
        b = window.shape[0]
        x = fold_slices(window) if two_d else window
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if not shared_encoder:
                out = torch.stack([model(x, m.to(x.device))[0].float() for m in masks])
            else:
                enc = model.encode(x)  # the expensive part, once per window
                if blend is not None:
                    out = torch.stack([model.decode(blended_encoding(enc, m, blend), torch.tensor(ALL_PRESENT)).float()
                                       for m in masks])
                elif hasattr(model, "decode_many"):
                    items = DECODE_BATCH_ITEMS if small else DECODE_BATCH_ITEMS_LARGE
                    out = model.decode_many(enc, masks, chunk=decode_batch or max(1, items // x.shape[0])).float()
                else:
                    out = torch.stack([model.decode(enc, m.to(x.device)).float() for m in masks])
        out = out.transpose(0, 1).flatten(1, 2)  # (n, b', 3, ...) -> (b', 3n, ...)
        if probs:
            out = torch.sigmoid(out)
        return unfold_slices(out, b) if two_d else out

    return predictor


def _as_image(image) -> torch.Tensor:
    x = image.as_tensor() if hasattr(image, "as_tensor") else image
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32)
    if x.ndim != 4 or x.shape[0] != N_MOD:
        raise ValueError(f"image must be ({N_MOD}, X, Y, Z), got {tuple(x.shape)}")
    return x


@torch.no_grad()
def predict_subsets(
    model: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    subsets: Sequence,
    roi_size: Sequence[int] | None = None,
    overlap: float = 1 / 3,
    sw_batch_size: int = 1,
    device: torch.device | str | None = None,
    mode: str = "constant",
    average: str = "probs",
    amp: bool = False,
    crop_foreground: bool = True,
    decode_batch: int | None = None,
    blend: Sequence[float] | None = None,
) -> torch.Tensor:
    """Sliding-window probabilities of one case for several modality subsets at once.

    Args:
        model: an ``LCKDNet`` (or any model with the interface in the module docstring), in eval mode.
        image: ``(4, X, Y, Z)`` already normalised (see ``transforms.normalize_image``).
        subsets: availability masks (anything :func:`lckd_kit.as_mask` reads), e.g. ``SUBSETS``.
        roi_size: window in kit layout, default :func:`default_roi`. 2-D models: ``(rx, ry, k)`` with
            ``k`` axial slices per window.
        overlap: window overlap fraction (reference: 1/3); 2-D models: in-plane only (slices are
            independent, so overlapping along Z would only cost time).
        sw_batch_size: windows per forward pass.
        device: where the model runs (default: the model's device). The result is on the CPU.
        mode: MONAI blend mode, ``"constant"`` (reference: plain average) or ``"gaussian"``.
        average: ``"probs"`` averages sigmoid probabilities over windows (reference ``eval.py``);
            ``"logits"`` averages raw logits and applies the sigmoid once (reference election).
        amp: bfloat16 autocast (CUDA only; ignored elsewhere).
        crop_foreground: process only the brain's bounding box (:func:`brain_box`); probability 0
            outside it. False runs on the whole volume, as the reference.
        decode_batch: subsets per decoder call (``LCKDNet.decode_many``); None picks it from
            :data:`DECODE_BATCH_ITEMS` / :data:`DECODE_BATCH_ITEMS_LARGE`.
        blend: optional ``(4,)`` feature-blend weights (:func:`blended_encoding`); the explorer's
            "what if this modality's deep summary were the fill" view.

    Returns:
        ``(n_subsets, 3, X, Y, Z)`` float32 probabilities, channels ET, TC, WT.

    Memory: the stitched output holds ``3 * n_subsets`` volumes of the processed box (15 subsets of
    a 240x240x155 volume at 1 mm would be 1.6 GB in float32; resample first, see :func:`predict_case`).
    """
    return _sliding(model, image, subsets, roi_size, overlap, sw_batch_size, device, mode, average, amp,
                    crop_foreground, decode_batch, blend, shared_encoder=hasattr(model, "encode"))


def _sliding(model, image, subsets, roi_size, overlap, sw_batch_size, device, mode, average, amp, crop_foreground,
             decode_batch, blend, shared_encoder: bool) -> torch.Tensor:
    if average not in ("probs", "logits"):
        raise ValueError(f"average must be 'probs' or 'logits', got {average!r}")
    masks = [torch.tensor(as_mask(s)) for s in subsets]
    if not masks:
        raise ValueError("no subsets requested")
    n = len(masks)
    cfg = model_config(model)
    device = torch.device(device) if device is not None else _device_of(model)
    x = _as_image(image)
    two_d = cfg.spatial_dims == 2
    roi = tuple(int(r) for r in (roi_size or default_roi(model, x.shape[1:])))
    if len(roi) != 3:
        raise ValueError(f"roi_size must have 3 entries (rx, ry, rz or slices), got {roi}")
    predictor = _window_predictor(model, masks, two_d, device, amp and device.type == "cuda", decode_batch, blend,
                                  probs=average == "probs", shared_encoder=shared_encoder)
    box = (slice(None),) * 3
    if crop_foreground:
        box = brain_box(x)
        if box is None:  # nothing to segment
            return torch.zeros(n, 3, *x.shape[1:])
    stitched = sliding_window_inference(
        x[(slice(None), *box)][None], roi, sw_batch_size, predictor,
        overlap=(overlap, overlap, 0.0) if two_d else overlap, mode=mode, sw_device=device, device=device)
    if hasattr(stitched, "as_tensor"):
        stitched = stitched.as_tensor()
    if average == "logits":
        stitched = torch.sigmoid(stitched)
    stitched = stitched.reshape(n, 3, *stitched.shape[2:]).float().cpu()
    if not crop_foreground:
        return stitched
    out = torch.zeros(n, 3, *x.shape[1:])
    out[(slice(None), slice(None), *box)] = stitched
    return out


@torch.no_grad()
def per_subset_reference(
    model: torch.nn.Module,
    image: torch.Tensor | np.ndarray,
    subsets: Sequence,
    roi_size: Sequence[int] | None = None,
    overlap: float = 1 / 3,
    device: torch.device | str | None = None,
    mode: str = "constant",
    sw_batch_size: int = 1,
    crop_foreground: bool = True,
) -> torch.Tensor:
    """The slow path: one sliding-window pass per subset with ``model(window, mask)`` (the reference's
    way, one ``--mode`` per run). Same windows, blending and probability averaging as
    :func:`predict_subsets`, so both agree to float precision; used by tests and benchmarks.

    Returns ``(n_subsets, 3, X, Y, Z)`` float32 probabilities on the CPU.
    """
    return _sliding(model, image, subsets, roi_size, overlap, sw_batch_size, device, mode, "probs", False,
                    crop_foreground, None, None, shared_encoder=False)


# --------------------------------------------------------------------------------------------
# a whole case, at the model's resolution, back on the case's grid


#: beyond this factor between a scan's voxels and the model's, inference warns: the model then sees
#: much more (or less) detail per voxel than anything it was trained on
RESAMPLING_WARN_FACTOR = 2.5


class CasePrediction:
    """Probabilities of ``n`` modality subsets for one case, on the case's own grid.

    They are computed on the model's grid and mapped back subset by subset when asked for:
    ``pred[i]`` is ``(3, X, Y, Z)`` float32 (ET, TC, WT) for ``masks[i]``; ``pred.regions(i)`` the
    nested binary masks the evaluation scores. ``resampling`` is None when the case was already
    at the model's voxel size (then nothing is resampled at all).
    """

    def __init__(self, probs: torch.Tensor, masks: list[tuple[bool, ...]], resampling=None):
        self.model_grid, self.masks, self.resampling = probs, masks, resampling

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> torch.Tensor:
        p = self.model_grid[i]
        return p if self.resampling is None else self.resampling.to_case(p).clamp_(0, 1)

    def regions(self, i: int) -> torch.Tensor:
        """Nested region masks ``(3, X, Y, Z)`` bool: probability > 0.5, then TC |= ET, WT |= TC."""
        from lckd_kit.metrics import nest_regions

        return nest_regions(self[i] > 0.5)


def model_input(model: torch.nn.Module, case) -> tuple[torch.Tensor, object]:
    """A case as the model was trained to see it -> ``(image (4, *grid), resampling or None)``.

    Resampled to ``model.config.spacing`` when the case's voxels differ (``transforms.Resampling``),
    then normalised as the model was trained (``model.config.normalization``) unless the case dict
    says it already is. ``case``: anything ``data.as_case`` reads.
    """
    import warnings

    from lckd_kit.data import as_case
    from lckd_kit.transforms import normalize_image, resampling_for

    case = as_case(case)
    cfg = model_config(model)
    spacing = getattr(cfg, "spacing", None)
    affine = case.get("affine")
    if affine is None and case.get("spacing") is not None:
        affine = np.diag([*case["spacing"], 1.0])
    image = torch.as_tensor(case["image"])
    res = resampling_for(affine, image.shape[1:], spacing)
    if res is not None:
        if max(max(res.factors), 1 / min(res.factors)) > RESAMPLING_WARN_FACTOR:
            warnings.warn(f"case {case['name']}: voxels of {tuple(round(v, 2) for v in res.src_spacing)} mm resampled "
                          f"to the model's {tuple(spacing)} mm; the model never saw a scan this much finer or coarser "
                          f"than its training data", stacklevel=3)
        image = res.to_model(image)
    if not case.get("normalized"):
        image = normalize_image(image, getattr(cfg, "normalization", "zscore"))
    return image, res


@torch.no_grad()
def predict_volume(model: torch.nn.Module, case, subsets: Sequence, **kwargs) -> CasePrediction:
    """Probabilities of every subset for one case, at the model's resolution, back on the case's grid.

    The path every view of a trained model takes on a whole case (evaluation, ``predict``, the
    explorer): :func:`model_input`, then :func:`predict_subsets` (``kwargs``: its options), then
    the map back (:class:`CasePrediction`). The model is used in eval mode (restored afterwards).
    """
    masks = [as_mask(s) for s in subsets]
    image, res = model_input(model, case)
    was_training = model.training
    model.eval()
    try:
        probs = predict_subsets(model, image, masks, **kwargs)
    finally:
        model.train(was_training)
    return CasePrediction(probs, masks, res)


@torch.no_grad()
def predict_case(
    model: torch.nn.Module,
    case,
    available=ALL_PRESENT,
    out_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 1 / 3,
    postprocess: bool = False,
    et_min_voxels: float = 500,
    sw_batch_size: int = 1,
    force: bool = False,
):
    """Segment one case from the ``available`` modalities only.

    Args:
        case: anything ``data.as_case`` reads (a ``Case``, a case folder, a loaded dict), at any
            voxel size: it is resampled to the model's and the result mapped back (:func:`predict_volume`).
        available: modality mask / name (``"flair+t1ce"``); the other channels are never read.
        out_path: a ``.nii[.gz]`` file, or an existing folder (then ``<folder>/<case>_<subset>.nii.gz``);
            None returns the regions instead of writing. Checked before anything is computed: never
            one of the case's own files, nor inside its folder (a later search would read the
            prediction as part of the case) unless ``force``.
        roi_size: sliding window (default :func:`default_roi`).
        postprocess: apply the reference's small-ET rule (``metrics.postprocess_et``).

    Returns:
        The written path -- a label NIfTI in the case's own geometry (original orientation and
        affine) and label convention, via ``data.save_prediction`` -- or, without ``out_path``,
        ``(3, X, Y, Z)`` uint8 nested region masks (ET, TC, WT) on the case's grid (RAS).
    """
    from lckd_kit.data import as_case, save_prediction
    from lckd_kit.metrics import postprocess_et

    loaded = as_case(case)
    mask = as_mask(available)
    out = None if out_path is None else prediction_path(loaded, mask, out_path, force=force)
    regions = predict_volume(model, loaded, [mask], roi_size=roi_size, overlap=overlap, device=device,
                             sw_batch_size=sw_batch_size).regions(0)
    if postprocess:
        regions = postprocess_et(regions, loaded["spacing"] or 1.0, et_min_voxels)
    regions = regions.numpy().astype(np.uint8)
    if out is None:
        return regions
    return save_prediction(regions, loaded, out)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def prediction_path(case: dict, available, out_path: str | os.PathLike, force: bool = False) -> Path:
    """Where :func:`predict_case` writes the prediction of ``case`` (an ``as_case`` dict) for the
    subset ``available``: ``out_path`` itself (a ``.nii`` / ``.nii.gz`` name) or, for an existing
    folder, ``<folder>/<case>_<subset>.nii.gz``. Raises ValueError, before any work is done, for
    another name, a case without geometry, a path whose folder is a file, or (unless ``force``) one
    of the case's own files or a path inside the case's folder."""
    import re

    if "original_affine" not in case:
        raise ValueError("writing a prediction needs the case's geometry: pass a data.Case or a load_case dict")
    out = Path(out_path)
    if out.is_dir():
        out = out / f"{case['name']}_{subset_name(as_mask(available))}.nii.gz"
    elif re.search(r"\.nii(\.gz)?$", out.name, re.IGNORECASE) is None:
        raise ValueError(f"{out}: prediction files must end in .nii or .nii.gz (or pass an existing folder)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{out}: {parent} is a file, not a folder; choose another output path")
            break
    src = case.get("case")
    files = [] if src is None or not hasattr(src, "image_files") else \
        [Path(f) for f in src.image_files.values()] + ([Path(src.label_file)] if src.label_file else [])
    if not force:
        for f in files:
            if out.exists() and f.exists() and os.path.samefile(out, f) or out.resolve() == f.resolve():
                raise ValueError(f"{out}: is an input file of case {case['name']}; writing there would destroy it: "
                                 f"choose another output path")
        if files and _inside(out.parent, files[0].parent):
            raise ValueError(f"{out}: is inside the folder of case {case['name']} ({files[0].parent}), where the "
                             f"next search would read it as a file of the case; write elsewhere (or force=True)")
    return out


__all__ = ["CasePrediction", "model_input", "predict_volume", "predict_case", "prediction_path", "predict_subsets", "per_subset_reference", "default_roi", "model_config", "fold_slices",
           "unfold_slices", "blended_encoding", "brain_box", "SLICES_PER_WINDOW_2D"]
