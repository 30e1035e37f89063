"""Where a target keeps its copy: a block device or a regular image file.

One small abstract class and two backends (as Patroni's DCS backends): the
daemon's receiver and the tests' replay apply ring records through it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from abc import ABC, abstractmethod
from pathlib import Path

from repctl.errors import ReplError

# linux/fs.h
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
SECTOR = 512


class StoreError(ReplError):
    """The target's backing store cannot be opened, read, written or made durable.

    The message names the file or device, the operation and the system's reason; `errno` is the
    system's error number (ENOSPC for a full file system), None where there is none."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def _failed(path: str, what: str, e: OSError) -> StoreError:
    reason = e.strerror or str(e)
    name = errno.errorcode.get(e.errno or 0)
    return StoreError(f"{path}: {what} failed: {reason}" + (f" ({name})" if name else ""),
                      e.errno)


class Store(ABC):
    """A byte-addressed copy of the replicated device."""

    def __init__(self, path: str | Path, fd: int):
        self.path = str(path)
        self.fd = fd

    @property
    @abstractmethod
    def size(self) -> int:
        """Size in bytes."""

    # Every operation raises StoreError (naming the file, the operation, the reason) when the
    # system fails it: the caller tells a failed copy from a failed connection by the type.

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as e:
            raise _failed(self.path, f"write of {len(data)} bytes at byte {offset}", e) from None

    def read(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as e:
            raise _failed(self.path, f"read of {length} bytes at byte {offset}", e) from None

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            # the kernel may have dropped the data it could not write back: nothing since the
            # last good flush is durable (the caller acknowledges nothing of it)
            raise _failed(self.path, "fdatasync", e) from None

    @abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Deallocate; reads of the range return zeros afterwards."""

    @abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None:
        """Make the range read as zeros."""

    def apply(self, op: str, sector: int, length: int, data: bytes | bytearray | memoryview,
              fua: bool) -> None:
        """Apply one ring record (op names as in repctl.uapi.OP_NAMES)."""
        offset = sector * SECTOR
        if op == "write":
            self.write(offset, data)
        elif op == "flush":
            self.flush()
        elif op == "discard":
            self.discard(offset, length)
        elif op == "write_zeroes":
            self.write_zeroes(offset, length)
        elif op == "noop":
            return
        else:
            raise StoreError(f"{self.path}: unknown record op {op!r}")
        if fua and op != "flush":
            self.flush()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BlockStore(Store):
    """A block device: discard and zeroing through the block layer's ioctls."""

    @property
    def size(self) -> int:
        buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", buf)[0])

    def _range_ioctl(self, req: int, offset: int, length: int) -> None:
        try:
            fcntl.ioctl(self.fd, req, struct.pack("QQ", offset, length))
        except OSError as e:
            raise _failed(self.path, f"zeroing {length} bytes at byte {offset}", e) from None

    def discard(self, offset: int, length: int) -> None:
        # a discard is only a hint; zeroing keeps the copy byte-identical
        # with a source whose discarded blocks read back as zeros
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._range_ioctl(BLKZEROOUT, offset, length)


class FileStore(Store):
    """A regular image file (disk-to-disk backup): holes for discards."""

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE would be cheaper; writing
        # zeros is portable and keeps the same bytes
        zero = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            n = min(len(zero), length - done)
            self.write(offset + done, zero[:n])
            done += n


def open_store(path: str | Path, *, size: int | None = None) -> Store:
    """Open a block device or an image file (created with ``size`` if missing)."""
    try:
        if size is not None and not os.path.exists(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, size)
            return FileStore(path, fd)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise StoreError(f"{path}: cannot open: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if stat.S_ISBLK(mode):
        return BlockStore(path, fd)
    if stat.S_ISREG(mode):
        return FileStore(path, fd)
    os.close(fd)
    raise StoreError(f"{path}: neither a block device nor a regular file")
