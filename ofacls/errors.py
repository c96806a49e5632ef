"""Every error ofacls raises on purpose. Only the CLI maps them to exit codes."""

from __future__ import annotations

import os


def debug() -> bool:
    """OFACLS_DEBUG set to anything but empty, 0, false, no or off: errors that would
    become one line (or an error row) are raised with their traceback instead."""
    return os.environ.get("OFACLS_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


class OfaclsError(Exception):
    """Base of every error ofacls raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint  # what to do next, where the message alone leaves a dead end

    def __str__(self) -> str:
        return f"{self.message}; hint: {self.hint}" if self.hint else self.message


class UsageError(OfaclsError):
    """The command line or an argument is wrong (exit 2)."""


class DeviceError(UsageError):
    """The requested device or precision is not available here."""


class OutputError(UsageError):
    """The output file exists, is locked by another run, or cannot be written."""


class ModelError(OfaclsError):
    """The model could not be found, downloaded or loaded (exit 3)."""


class ModelNotFoundError(ModelError):
    """No model folder at that path, and not in the local cache."""


class HubError(ModelError):
    """The ModelScope hub could not be reached or refused the download."""

    def __init__(self, message: str, *, hint: str | None = None, needs: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.needs = needs  # the model id a run without the hub must get another way


class ClusterError(ModelError):
    """The Ray cluster could not be reached, joined or started (exit 3: as without
    a model, nothing can be classified)."""


class CheckpointError(ModelError):
    """A model file is missing, corrupt, or does not match the architecture."""


class InputError(OfaclsError):
    """One input could not be read or classified; the batch goes on (exit 1)."""


class FetchError(InputError):
    """A URL could not be fetched: refused scheme, HTTP error, timeout, too large."""


class ImageError(InputError):
    """The bytes are not an image ofacls can decode, or the image is too large."""
