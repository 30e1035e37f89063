"""The daemon's state files: one way to write them, one way to read them.

Every file under the state folder (a target's ``.json`` and ``.oos``, ``generation.json``,
``target.json``) is replaced atomically: written to a temporary file of its own, unique to this
write, fsynced, renamed over the old one, and the folder fsynced, so that after a power cut the
file is either the old or the new content, never a mix, never missing, and never another file's.
The one exception: once an ``.oos`` file exists, repctl.oos updates its changed pages in place
(its module docstring says why a mix of old and new pages is safe for a bitmap).

A file that exists but cannot be read back (not JSON, wrong shape, wrong size) is a
``StateError`` naming the file and what to do: the caller decides the safe fallback (for a
bitmap: all dirty, never clean).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from repctl.errors import ReplError


class StateError(ReplError):
    """A state file exists but its content is unusable."""

    def __init__(self, path: Path, problem: str, action: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}; {action}")


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` by `data` durably: the old or the new content survives a crash, nothing else.

    Safe to call concurrently for different files of the same folder, and for the same file
    (the last rename wins; each writer's temporary file is its own).
    """
    os.close(atomic_write_open(path, data, mode))


def atomic_write_open(path: Path, data: bytes, mode: int = 0o600) -> int:
    """As atomic_write, and return the new file open for reading and writing: a descriptor of
    the very file that was renamed into place, for a caller that updates it in place later
    (repctl.oos). The caller closes it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON state file atomically (see atomic_write)."""
    atomic_write(path, json.dumps(data, sort_keys=True).encode())


def load_json(path: Path, default: dict[str, Any], *, action: str,
              check: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
    """The JSON object in `path`, or a copy of `default` if there is no such file.

    Raises StateError (with `action`, what the administrator should do) if the file holds
    anything but a JSON object, or if `check` returns a problem for it.
    """
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return dict(default)
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(path, f"not valid JSON ({e})", action) from None
    if not isinstance(data, dict):
        raise StateError(path, f"holds a JSON {type(data).__name__}, not an object", action)
    problem = check(data) if check is not None else None
    if problem:
        raise StateError(path, problem, action)
    return data


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary files left by writes that a crash interrupted (they are never read)."""
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


__all__ = ["StateError", "atomic_write", "atomic_write_open", "fsync_dir", "load_json",
           "remove_stale_temporaries", "save_json"]
