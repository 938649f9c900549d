"""Errors users see. Each names the file and the field, so the message alone says what to fix."""
from __future__ import annotations

from pathlib import Path


class MiniCPMVEdgeError(Exception):
    """Base for every error the CLI reports as one line instead of a traceback."""


class FileError(MiniCPMVEdgeError):
    """Something wrong in one file: the message starts with the file and the field, then what is wrong."""

    def __init__(self, path: str | Path, message: str, field: str | None = None):
        self.path = Path(path)
        self.field = field
        super().__init__(f"{self.path}" + (f": {field}" if field else "") + f": {message}")


class CheckpointError(FileError):
    """A checkpoint directory is missing a file, a field or a tensor, or holds an inconsistent value."""


class BundleError(FileError):
    """A bundle's manifest.json is malformed or out of range, or a file it lists is missing or changed."""


class UntrustedFileError(FileError):
    """A file from outside breaks a safety rule (minicpmv_edge/untrusted.py): a path that escapes its folder,
    something that is not a regular file, JSON too large, too deep or with oversized integers."""


class PromptError(MiniCPMVEdgeError):
    """A chat template does not render, or a request does not fit the prompt grammar."""


class UnknownVersionError(MiniCPMVEdgeError, ValueError):
    """A MiniCPM-V version that is not in the model-facts table (or not supported yet)."""


class MissingExtraError(MiniCPMVEdgeError):
    """A command needs an optional dependency group that is not installed."""

    def __init__(self, extra: str, module: str):
        super().__init__(f"this command needs the '{extra}' extra (missing module '{module}'): "
                         f"pip install 'minicpmv-edge[{extra}]'")
