"""Errors users see. Each names the file and the field, so the message alone says what to fix."""
from __future__ import annotations

from pathlib import Path


class MiniCPMVEdgeError(Exception):
    """Base for every error the CLI reports as one line instead of a traceback."""


class CheckpointError(MiniCPMVEdgeError):
    """A checkpoint directory is missing a file, a field or a tensor, or holds an inconsistent value."""

    def __init__(self, path: str | Path, message: str, field: str | None = None):
        self.path = Path(path)
        self.field = field
        where = f"{self.path}" + (f": {field}" if field else "")
        super().__init__(f"{where}: {message}")


class UntrustedFileError(MiniCPMVEdgeError):
    """A file from outside breaks a safety rule (minicpmv_edge/untrusted.py): a path that escapes its folder,
    something that is not a regular file, JSON too large, too deep or with oversized integers."""

    def __init__(self, path: str | Path, message: str, field: str | None = None):
        self.path = Path(path)
        self.field = field
        super().__init__(f"{self.path}" + (f": {field}" if field else "") + f": {message}")


class MissingExtraError(MiniCPMVEdgeError):
    """A command needs an optional dependency group that is not installed."""

    def __init__(self, extra: str, module: str):
        super().__init__(f"this command needs the '{extra}' extra (missing module '{module}'): "
                         f"pip install 'minicpmv-edge[{extra}]'")
