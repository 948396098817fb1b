"""Checkpoints and training histories on disk, and the reference code's weights.

A checkpoint is a plain dict of tensors and JSON-like values, loadable with
``torch.load(..., weights_only=True)``: no pickled objects, nothing executed on load.

    {"format": CHECKPOINT_FORMAT, "model": state_dict, "config": {... "model_config": {...}},
     "step": int, "teachers": [4 bools], "elections": [records], ...,
     "kit_version": "0.1.0", "checksum": "sha256:..."}

:func:`save` writes it atomically (a temporary file in the same folder, flushed to disk, then a
rename), so a reader never sees half a file, and seals it with a checksum: sha256 over every
tensor's bytes (with its name, dtype and shape) and every other entry, the kit version and the
config included. :func:`load_checkpoint` verifies it, so a flipped bit in a weight is refused
instead of silently changing predictions; format-1 files (no checksum) still load, with a warning.
Every way a file can fail to be a usable checkpoint (missing, empty, truncated, not a checkpoint,
a pickle that would run code, a checksum mismatch, weights that do not fit the stored config)
raises one :class:`CheckpointError` saying what is wrong and what to do. :func:`load_model`
rebuilds the model from the stored config.

A run folder (``train(out_dir=...)``) also holds ``last.pt`` and its predecessor ``last.prev.pt``
(:func:`save_rotating`), a lock file ``.lock`` while a run writes to it (:class:`RunLock`) and
``history.jsonl``: one JSON record per line (:class:`HistoryWriter` appends and flushes each one;
:func:`read_history` reads them, skipping a line still being written).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Iterator, Mapping

import torch

CHECKPOINT_FORMAT = "lckd_kit/2"
#: formats :func:`load_checkpoint` reads; "lckd_kit/1" has no checksum (loaded with a warning)
READABLE_FORMATS = ("lckd_kit/1", CHECKPOINT_FORMAT)

_warned_unverified: set[str] = set()


class CheckpointError(ValueError):
    """A file that is not a usable lckd_kit checkpoint; the message says why and what to do."""


def _walk(obj, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(path, leaf) of a nested dict / list in a fixed order (dict keys sorted by their repr)."""
    if isinstance(obj, Mapping):
        for key in sorted(obj, key=repr):
            yield from _walk(obj[key], f"{prefix}/{key!r}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{prefix}/{i}")
    else:
        yield prefix, obj


def checksum(ckpt: Mapping) -> str:
    """``"sha256:<hex>"`` over every entry of ``ckpt`` except ``"checksum"``: each tensor's name,
    dtype, shape and raw bytes, and the repr of every other value (config, kit version, step, ...)."""
    h = hashlib.sha256()
    for path, value in _walk({k: v for k, v in ckpt.items() if k != "checksum"}):
        h.update(path.encode())
        if torch.is_tensor(value):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"={t.dtype}{tuple(value.shape)};".encode())
            h.update(t.view(torch.uint8).numpy())  # the stored bytes, whatever the dtype
        else:
            h.update(f"={value!r};".encode())
    return "sha256:" + h.hexdigest()


def seal(ckpt: Mapping) -> dict:
    """A copy of a kit checkpoint dict in the current format, with the kit version and checksum."""
    from lckd_kit import __version__

    out = {k: v for k, v in ckpt.items() if k != "checksum"}
    out.update(format=CHECKPOINT_FORMAT, kit_version=__version__)
    out["checksum"] = checksum(out)
    return out


def _is_kit_checkpoint(obj) -> bool:
    return isinstance(obj, Mapping) and "model" in obj and str(obj.get("format", "")).startswith("lckd_kit/")


def _nbytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (what a checkpoint file needs, give or take a few kB)."""
    return sum(v.numel() * v.element_size() for _, v in _walk(obj) if torch.is_tensor(v)) if isinstance(
        obj, (Mapping, list, tuple)) else 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{max(n, 1) / 1e3:.0f} kB"


def _write_error(exc: OSError, path: Path, obj) -> OSError:
    """The OSError of a failed checkpoint write, saying how much space the file needs."""
    need = _mb(_nbytes(obj) + 64_000)
    reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.ENOTDIR: "a file is in the way of its folder", errno.EEXIST: "a file is in the way of its folder",
              }.get(exc.errno, exc.strerror or type(exc).__name__)
    err = OSError(exc.errno, f"cannot write the checkpoint ({need} needed): {reason}; the previous files are left "
                             f"as they were", str(path))
    return err


def _write_tmp(obj, path: Path) -> Path:
    """Write ``obj`` (sealed if it is a kit checkpoint) to a temporary file next to ``path``, on disk."""
    if _is_kit_checkpoint(obj):
        obj = seal(obj)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    except OSError as e:
        _unlink_quietly(tmp)
        raise _write_error(e, path, obj) from e
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def save(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then rename: never a half-written file.

    A kit checkpoint (a dict with ``"model"`` and an ``lckd_kit/...`` format) is written in the
    current format with its checksum (:func:`seal`); ``obj`` itself is not changed. A failed write
    (disk full, read-only, ...) raises OSError saying how much space the file needs, and leaves any
    existing ``path`` untouched."""
    path = Path(path)
    tmp = _write_tmp(obj, path)
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(e, path, obj) from e
    finally:
        if tmp.exists():
            _unlink_quietly(tmp)
    return path


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_rotating` keeps the file it replaces: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_rotating(obj: dict, path: str | os.PathLike) -> Path:
    """:func:`save`, keeping the file it replaces as :func:`previous_path` (``last.prev.pt``).

    The new file is complete on disk before anything is renamed, and the old one becomes the
    previous one through a hard link, so at every moment ``path`` is a complete checkpoint (where
    the file system has no hard links, there is a moment with only the previous one, which
    ``train(resume=True)`` falls back to)."""
    path = Path(path)
    prev = previous_path(path)
    tmp = _write_tmp(obj, path)
    link = prev.with_name(f".{prev.name}.tmp-{os.getpid()}")
    try:
        if path.exists():
            try:
                _unlink_quietly(link)
                os.link(path, link)
                os.replace(link, prev)
            except OSError:  # no hard links here: move it (resume then falls back to prev)
                os.replace(path, prev)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(e, path, obj) from e
    finally:
        for t in (tmp, link):
            if t.exists():
                _unlink_quietly(t)
    return path


def checkpoint_dict(model: torch.nn.Module, config: Mapping, **extra) -> dict:
    """The checkpoint of ``model`` (its bare state_dict, no DDP prefix, on the CPU) with ``config``
    (the train config dict, holding ``"model_config"``) and any further plain entries. :func:`save`
    adds the kit version and the checksum."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "model": state, "config": dict(config), **extra}


def _to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict:
    """Read a kit checkpoint safely (``weights_only=True``: plain types and tensors only) and verify
    its checksum. Raises FileNotFoundError when there is no file and :class:`CheckpointError` for
    anything that is not a usable checkpoint (the message says what to do)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file; pass a .pt file (a run folder holds "
                              f"final.pt and last.pt)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), it was never completely written; use another "
                              f"checkpoint (a run folder keeps last.prev.pt) or train again")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: this file is not a safe lckd_kit checkpoint: it holds Python objects that "
                              f"loading would have to run ({_first_line(e)[:80]}...); never load it unless you "
                              f"trust where it came from") from e
    except OSError:
        raise
    except Exception as e:  # torch's zip reader, the legacy loader and pickle raise many types
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({size} bytes; {_first_line(e)}): it is "
                              f"truncated or not a checkpoint; use another copy (a run folder keeps last.prev.pt)") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        what = (f"format {ckpt.get('format')!r}" if isinstance(ckpt, dict) and "format" in ckpt else
                "a bare state_dict (load it with model.load_state_dict)" if isinstance(ckpt, dict) and ckpt and
                all(torch.is_tensor(v) for v in ckpt.values()) else f"a {type(ckpt).__name__}")
        raise CheckpointError(f"{path}: not an lckd_kit checkpoint ({what}; expected format {CHECKPOINT_FORMAT!r}); "
                              f"pass a file written by lckd-kit train or checkpoint.save")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("config"), dict) or \
            "model_config" not in ckpt["config"]:
        raise CheckpointError(f"{path}: an lckd_kit checkpoint without its weights or model config; use another "
                              f"checkpoint")
    if ckpt["format"] == CHECKPOINT_FORMAT:
        stored = ckpt.get("checksum")
        if stored is None or checksum(ckpt) != stored:
            raise CheckpointError(f"{path}: checksum mismatch: the file changed after it was saved (damaged disk, "
                                  f"interrupted copy or an edit), so its weights cannot be trusted; use another "
                                  f"copy (a run folder keeps last.prev.pt) or train again")
    else:
        key = str(path.resolve())
        if key not in _warned_unverified:
            _warned_unverified.add(key)
            warnings.warn(f"{path}: format {ckpt['format']!r} has no checksum, so damage cannot be detected; "
                          f"checkpoint.save(load_checkpoint(path), path) adds one", stacklevel=2)
    return ckpt if torch.device(device).type == "cpu" else _to_device(ckpt, device)


def fit_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``model.load_state_dict(state)``; weights that do not fit the model raise one
    :class:`CheckpointError` naming the first misfits instead of torch's page of them."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} size mismatch(es), e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in the model")
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if extra:
            parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
        raise CheckpointError(f"{path}: its weights do not fit the model config stored with them ({'; '.join(parts)}): "
                              f"the file was edited or pieced together; use an unmodified checkpoint")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not load into the model ({_first_line(e)}); use an unmodified "
                              f"checkpoint") from e


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Rebuild the trained model from a checkpoint -> ``(model in eval mode on device, checkpoint dict)``."""
    from lckd_kit.methods import build  # any registered method; a dict without "method" is LCKD

    ckpt = load_checkpoint(path, device)
    try:
        model = build(ckpt["config"]["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model config cannot be built ({_first_line(e)}); use an unmodified "
                              f"checkpoint") from e
    fit_state_dict(model, ckpt["model"], path)
    return model.to(device).eval(), ckpt


# --------------------------------------------------------------------------------------------
# run folders: one writer at a time, no stale temporaries


_TMP = re.compile(r"^\..+\.tmp-(?P<pid>\d+)$")


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux /proc; None elsewhere or when it is gone), to tell a
    process from a later one that reused its PID."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has finished
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` of this host still runs (and, given ``start``, is the same process)."""
    if pid <= 0:
        return False
    if os.path.isdir("/proc"):
        now = _process_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (``.<name>.tmp-<PID>``) that killed processes left in ``folder``;
    returns them. Files of live processes are left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if m and int(m["pid"]) != os.getpid() and not pid_alive(int(m["pid"])) and p.is_file():
            _unlink_quietly(p)
            removed.append(p)
    return removed


class RunFolderBusy(ValueError):
    """Another live process is writing to this run folder."""


class RunLock:
    """``OUT/.lock`` while a run writes to ``OUT``: its PID, host and start time.

    ``acquire()`` creates the folder and the lock (atomically: O_EXCL), or raises
    :class:`RunFolderBusy` naming the owner. A lock whose owner is gone (same host, PID no longer
    running, or running but a different process) is taken over; ``took_over`` then describes it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / ".lock"
        self.took_over: dict | None = None
        self.held = False
        self.created = False  # the folder did not exist: removed again if the run leaves it empty

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def _stale(self, owner: dict | None) -> bool:
        if owner is None:  # unreadable: being written now, or its writer died at that moment
            try:
                return time.time() - self.path.stat().st_mtime > 10
            except OSError:
                return True
        if not owner:
            return True
        if owner.get("host") != socket.gethostname():
            return False  # another machine's process: cannot be checked from here
        return not pid_alive(int(owner.get("pid", -1)), owner.get("start"))

    def acquire(self) -> "RunLock":
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                self._create(json.dumps(me) + "\n")
            except FileExistsError:
                owner = self._owner()
                if not self._stale(owner):
                    who = (f"PID {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}" if owner else
                           "a process that is starting")
                    raise RunFolderBusy(
                        f"{self.folder}: another run is writing to this folder ({who}); wait for it to end or use "
                        f"another --out (if that process is gone, delete {self.path})") from None
                self.took_over = owner or {}
                _unlink_quietly(self.path)
                continue
            self.held = True
            return self
        raise RunFolderBusy(f"{self.folder}: could not take the run lock {self.path}; try again")

    def _create(self, text: str) -> None:
        """Create the lock with its content in one step (a complete file linked into place), so
        no process ever sees an empty lock; FileExistsError if there is one."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system: create exclusively, then write
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        finally:
            _unlink_quietly(tmp)

    def release(self) -> None:
        if self.held:
            owner = self._owner()
            if owner and owner.get("pid") == os.getpid():
                _unlink_quietly(self.path)
            self.held = False
            if self.created:
                try:
                    self.folder.rmdir()  # only if the run wrote nothing (fails on a non-empty folder)
                except OSError:
                    pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


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


__all__ = ["CHECKPOINT_FORMAT", "READABLE_FORMATS", "CheckpointError", "checksum", "seal", "save", "save_rotating",
           "previous_path", "checkpoint_dict", "load_checkpoint", "fit_state_dict", "load_model", "RunLock",
           "RunFolderBusy", "remove_orphans", "pid_alive", "read_history",
           "HistoryWriter", "REFERENCE_RENAMES", "convert_reference_state_dict", "load_reference_state_dict",
           "to_reference_state_dict"]
