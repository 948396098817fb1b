"""The method registry: which missing-modality methods the kit knows, and how a config (object,
name or a checkpoint's stored dict) becomes that method's model.

LCKD is registered here, as the default (a config dict without ``"method"`` is LCKD's);
:mod:`lckd_kit.methods` registers the kit's other methods when it is imported, and re-exports
everything below, so ``lckd_kit.methods`` is the place to use it from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch.nn as nn

from lckd_kit import model as lckd_model


@dataclass(frozen=True)
class Method:
    """A registered method: its config class, model class and named configs."""

    name: str
    config_cls: type
    model_cls: type
    configs: dict
    description: str = ""


REGISTRY: dict[str, Method] = {}

#: the fields a method's config must have (train.model_config_for sets the last three)
REQUIRED_FIELDS = ("name", "method", "spatial_dims", "roi_size", "spacing", "normalization")


def register(name: str, config_cls: type, model_cls: type, configs: Mapping[str, Any] | None = None,
             description: str = "") -> Method:
    """Make a method known to training, checkpoints, evaluation and the comparison.

    Args:
        name: the method's name, stored in every config dict as ``"method"``.
        config_cls: a frozen dataclass with :data:`REQUIRED_FIELDS` (its ``method`` field defaults to
            ``name``) and a ``size_divisor`` property.
        model_cls: ``model_cls(config)`` builds the network (the interface: :mod:`lckd_kit.methods`).
        configs: named configs (e.g. ``{"mine_small2d": MyConfig(name="mine_small2d")}``), usable as
            ``TrainConfig(model="mine_small2d")``.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} must be a dataclass")
    if name != "lckd":
        have = {f.name: f for f in fields(config_cls)}
        missing = [f for f in REQUIRED_FIELDS if f not in have]
        if missing:
            raise TypeError(f"{config_cls.__name__} lacks the field(s) {missing} (see lckd_kit.methods)")
        if have["method"].default != name:
            raise TypeError(f"{config_cls.__name__}.method must default to {name!r} (it is how a stored config "
                            f"finds its method), got {have['method'].default!r}")
    if not hasattr(config_cls, "size_divisor"):
        raise TypeError(f"{config_cls.__name__} needs a size_divisor property")
    named = dict(configs or {})
    taken = {k for other, meth in REGISTRY.items() if other != name for k in meth.configs}
    clash = sorted(set(named) & taken)
    if clash:
        raise ValueError(f"config name(s) {clash} already belong to another method")
    REGISTRY[name] = Method(name, config_cls, model_cls, named, description)
    return REGISTRY[name]


def unregister(name: str) -> None:
    """Forget a registered method (tests plug in their own and take it out again)."""
    if name == "lckd":
        raise ValueError("LCKD cannot be unregistered")
    REGISTRY.pop(name, None)


def method_of(config) -> str:
    """The method name of a config object or dict (no ``method``: LCKD)."""
    if isinstance(config, Mapping):
        return config.get("method", "lckd")
    return getattr(config, "method", "lckd")


def model_configs() -> dict[str, Any]:
    """Every named model config of every registered method: name -> config."""
    return {k: v for meth in REGISTRY.values() for k, v in meth.configs.items()}


def config_name_for(method: str, size: str = "small2d") -> str:
    """The named config of ``method`` at a size: ``("hemis", "small2d") -> "hemis_small2d"``;
    LCKD's configs are the size names themselves."""
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; registered: {sorted(REGISTRY)}")
    name = size if method == "lckd" else f"{method}_{size}"
    if name not in REGISTRY[method].configs:
        raise ValueError(f"method {method!r} has no {size!r} config; it has {sorted(REGISTRY[method].configs)}")
    return name


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-able dict of any registered config (tuples become lists); includes ``"method"``
    except for LCKD (whose dicts have always been method-less)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_from_dict(d: Mapping[str, Any]):
    """Rebuild a config from its dict (a checkpoint's ``"model_config"``); no ``"method"``: LCKD."""
    method = d.get("method", "lckd")
    if method not in REGISTRY:
        raise ValueError(f"config dict of unknown method {method!r}; registered: {sorted(REGISTRY)} "
                         f"(register it with lckd_kit.methods.register before loading)")
    if method == "lckd":
        return lckd_model.config_from_dict({k: v for k, v in d.items() if k != "method"})
    cls = REGISTRY[method].config_cls
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def as_config(config):
    """A config from a config object, a named config (any method) or a dict."""
    if isinstance(config, str):
        named = model_configs()
        if config not in named:
            raise ValueError(f"unknown model config {config!r}; expected one of {sorted(named)}")
        return named[config]
    if isinstance(config, Mapping):
        return config_from_dict(config)
    return config


def build(config) -> nn.Module:
    """The model of a config, a named config (``"hemis_small2d"``, ``"small2d"``) or a stored dict."""
    config = as_config(config)
    method = method_of(config)
    if method not in REGISTRY:
        raise ValueError(f"config of unknown method {method!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[method].model_cls(config)


def parameter_table(size: str = "small2d", methods: Sequence[str] | None = None) -> dict[str, int]:
    """Parameter count of each method's ``size`` config (LCKD's ``size`` itself): method -> count."""
    out = {}
    for method in methods or REGISTRY:
        try:
            out[method] = lckd_model.parameter_count(build(config_name_for(method, size)))
        except ValueError:
            continue
    return out


register("lckd", lckd_model.ModelConfig, lckd_model.LCKDNet, lckd_model.CONFIGS,
         "LCKD: shared encoder, mean-filled bottleneck, cross-modal distillation")


__all__ = ["Method", "REGISTRY", "REQUIRED_FIELDS", "register", "unregister", "method_of", "model_configs",
           "config_name_for", "config_to_dict", "config_from_dict", "as_config", "build", "parameter_table"]
