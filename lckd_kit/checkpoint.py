"""Checkpoints and training histories on disk, and the reference code's weights.

A checkpoint is a plain dict of tensors and JSON-like values, loadable with
``torch.load(..., weights_only=True)``: no pickled objects, nothing executed on load.

    {"format": CHECKPOINT_FORMAT, "model": state_dict, "config": {... "model_config": {...}},
     "step": int, "teachers": [4 bools], "elections": [records], ...}

:func:`save` writes it atomically (a temporary file in the same folder, then a rename), so a
reader never sees half a file. :func:`load_model` rebuilds the model from the stored config.

A run folder's ``history.jsonl`` holds one JSON record per line (:class:`HistoryWriter` appends
and flushes each one; :func:`read_history` reads them, skipping a line still being written).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

CHECKPOINT_FORMAT = "lckd_kit/1"


def save(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then rename: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def checkpoint_dict(model: torch.nn.Module, config: Mapping, **extra) -> dict:
    """The checkpoint of ``model`` (its bare state_dict, no DDP prefix, on the CPU) with ``config``
    (the train config dict, holding ``"model_config"``) and any further plain entries."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "model": state, "config": dict(config), **extra}


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Read a kit checkpoint safely (``weights_only=True``: plain types and tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an lckd_kit checkpoint (format {CHECKPOINT_FORMAT!r})")
    return ckpt


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild the trained model from a checkpoint -> ``(model in eval mode on device, checkpoint dict)``."""
    from lckd_kit.model import build_model

    ckpt = load_checkpoint(path, device)
    model = build_model(ckpt["config"]["model_config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


# --------------------------------------------------------------------------------------------
# history.jsonl


def read_history(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run_dir>/history.jsonl`` (or of that file itself), in order.

    A last line that does not parse (a live run is writing it) is skipped; [] if there is no file.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / "history.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class HistoryWriter:
    """Records in memory, each also appended (and flushed) to ``path`` when given.

    Opening rewrites ``path`` with ``records`` (what a resumed run keeps), then appends.
    """

    def __init__(self, path: Path | None, records: list[dict] | None = None):
        self.records, self.path = list(records or []), path
        self._file = None
        if path is not None:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(tmp, path)
            self._file = open(path, "a")

    def add(self, record: dict) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------------------------
# the reference code's (billhhh/LCKD DualNet) weights

#: name prefixes: reference -> kit (first match wins). Everything below a prefix is identical.
REFERENCE_RENAMES: tuple[tuple[str, str], ...] = (
    ("shared_dec.cls_conv.0.", "decoder.cls_conv."),
    ("shared_enc.", "encoder."),
    ("shared_dec.", "decoder."),
)
#: reference output rows (ET, WT, TC) -> kit rows (ET, TC, WT); the permutation is its own inverse
_ROW_ORDER = (0, 2, 1)
# a reference kernel (.., kd, kh, kw) in kit layout (X=H, Y=W, Z=D) is (.., kh, kw, kd); and back
_TO_KIT, _TO_REF = (0, 1, 3, 4, 2), (0, 1, 4, 2, 3)


def _rename(name: str, table) -> str:
    for src, dst in table:
        if name.startswith(src):
            return dst + name[len(src):]
    raise KeyError(f"no rename rule for parameter {name!r}")


def convert_reference_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference DualNet state_dict (D, H, W kernels, outputs ET, WT, TC) -> kit names and layout."""
    out = {}
    for name, t in state_dict.items():
        if name.startswith("module."):  # saved from nn.DataParallel
            name = name[len("module."):]
        key = _rename(name, REFERENCE_RENAMES)
        if t.dim() == 5:
            t = t.permute(_TO_KIT)
        if key == "decoder.cls_conv.weight":
            t = t[list(_ROW_ORDER)]
        out[key] = t.contiguous()
    return out


def load_reference_state_dict(model, state_dict: Mapping[str, torch.Tensor]):
    """Load the reference's weights (221 entries) into a "paper" model, strictly: every entry maps
    one-to-one. Afterwards ``model(x) == ref(x.permute(0, 1, 4, 2, 3)).permute(0, 1, 3, 4, 2)`` with
    the output channels reordered (ET, WT, TC) -> (ET, TC, WT). Returns ``model``."""
    if model.config.spatial_dims != 3:
        raise ValueError("reference weights are 3-D; build the 'paper' config")
    model.load_state_dict(convert_reference_state_dict(state_dict), strict=True)
    return model


def to_reference_state_dict(model) -> dict[str, torch.Tensor]:
    """Exact inverse of :func:`load_reference_state_dict`: kit model -> reference names, layout, row order."""
    inverse = tuple((dst, src) for src, dst in REFERENCE_RENAMES)
    out = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        if key == "decoder.cls_conv.weight":
            t = t[list(_ROW_ORDER)]
        if t.dim() == 5:
            t = t.permute(_TO_REF)
        out[_rename(key, inverse)] = t.contiguous()
    return out


__all__ = ["CHECKPOINT_FORMAT", "save", "checkpoint_dict", "load_checkpoint", "load_model", "read_history",
           "HistoryWriter", "REFERENCE_RENAMES", "convert_reference_state_dict", "load_reference_state_dict",
           "to_reference_state_dict"]
