"""Errors of the application layer that carry the exit code the command returns for them."""

from __future__ import annotations

__all__ = ["DeviceError", "UnavailableError"]


class DeviceError(ValueError):
    """The requested device does not exist on this machine (exit code 6)."""

    exit_code = 6


class UnavailableError(RuntimeError):
    """A part of the analysis cannot run for this problem or installation (exit code 13)."""

    exit_code = 13
