"""Where the kit's files are: bundled sample data, the shipped checkpoint, the cache.

The folders ``data_samples/`` and ``checkpoints/`` of the repository are installed as the packages
``lckd_kit.data_samples`` and ``lckd_kit.checkpoints`` (``pyproject.toml``), so they are found
through ``importlib.resources`` in an editable install, a wheel or a plain ``pip install .`` alike.
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

SHIPPED_CHECKPOINT_NAME = "lckd_small_phantom.pt"


def _package_dir(package: str) -> Path:
    return Path(str(files(package)))


def data_samples_dir() -> Path:
    """Folder of the bundled tissue prior and demo cases: ``$LCKD_KIT_DATA_SAMPLES`` if set, else the
    installed ``lckd_kit.data_samples``."""
    env = os.environ.get("LCKD_KIT_DATA_SAMPLES")
    return Path(env) if env else _package_dir("lckd_kit.data_samples")


def checkpoints_dir() -> Path:
    """Folder of the shipped checkpoint (the installed ``lckd_kit.checkpoints``)."""
    return _package_dir("lckd_kit.checkpoints")


def shipped_checkpoint() -> Path:
    """The trained model shipped with the kit (``checkpoints/lckd_small_phantom.pt``)."""
    return checkpoints_dir() / SHIPPED_CHECKPOINT_NAME


def method_checkpoint(method: str) -> Path:
    """A model of the committed method comparison (seed 0, small2d schedule): ``checkpoints/
    compare_<method>.pt`` for ``lckd``, ``dropout``, ``hemis`` or ``regionfusion`` (notebook 06's
    explorer). Same phantoms, schedule and seed for all four, so they can be compared fairly."""
    return checkpoints_dir() / f"compare_{method}.pt"


def source_checkout() -> Path | None:
    """The repository folder when the kit runs from a checkout (editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "lckd_kit").is_dir() else None


def default_cache_dir() -> Path:
    """``$LCKD_KIT_CACHE``, else ``<checkout>/.cache/lckd_kit``, else ``~/.cache/lckd_kit``."""
    env = os.environ.get("LCKD_KIT_CACHE")
    if env:
        return Path(env)
    root = source_checkout()
    return root / ".cache" / "lckd_kit" if root is not None else Path.home() / ".cache" / "lckd_kit"


__all__ = ["data_samples_dir", "checkpoints_dir", "shipped_checkpoint", "method_checkpoint", "source_checkout", "default_cache_dir",
           "SHIPPED_CHECKPOINT_NAME"]
