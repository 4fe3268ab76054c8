"""Checkpoints and other run files, written atomically.

A checkpoint is a dict of tensors and plain values, so ``torch.load(path, weights_only=True)`` reads it:
``model`` (state dict), ``model_config``, ``classes``, ``preprocess``, ``epoch``, ``best_miou``,
``history`` and, for resuming, ``optimizer``, ``scheduler``, ``rng`` and ``config``. Every file is
written to a temporary file in the same folder and renamed over the old one, so a crash (even SIGKILL)
leaves either the old file or the new one, never half of one.

Example:
    >>> import torch, tempfile, pathlib
    >>> from unetseg.checkpoint import save_checkpoint, load_checkpoint
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.pt"
    >>> save_checkpoint({"epoch": 3, "model": {"w": torch.ones(2)}}, p)
    >>> load_checkpoint(p, require=("epoch",))["epoch"]
    3
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch

from .errors import UnetsegError

# mkstemp creates files readable by their owner only; run files and exports get the permissions any other
# new file would (0o666 less the umask), so that another user (a server, a colleague) can read them.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` with ``torch.save`` through a temporary file and an atomic rename."""
    return _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, require: Iterable[str] = ("model", "model_config")) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; ``UnetsegError`` names the file if it is not one."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise UnetsegError(f"{path}: checkpoint not found (give a .pt file or a run directory)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt/foreign files
        raise UnetsegError(f"{path}: not a readable unetseg checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in require if not isinstance(state, dict) or k not in state]
    if missing:
        raise UnetsegError(f"{path}: not a unetseg checkpoint (missing {', '.join(missing)})")
    return state
