"""Errors raised before any process starts (the launcher's own are in :mod:`minipipe.runtime.launch`)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration that cannot run (raised before any process starts)."""
