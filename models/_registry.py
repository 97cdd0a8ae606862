"""Registry of backbone builders, so configs and checkpoints can name an architecture."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from equislide.models._errors import ModelConfigError

__all__ = ["register_model", "list_models", "create_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered backbone by name.

    Raises:
        ModelConfigError: ``name`` is not registered.
    """
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ModelConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return builder(**kwargs)
