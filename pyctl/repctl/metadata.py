"""The dm-repl metadata device: formatting and inspection from user space.

Layout (see ``struct repl_superblock`` in dm-repl-uapi.h): block 0 is the
superblock, blocks 1.. the dirty bitmap, one bit per chunk.  The kernel target
validates what is written here and refuses anything else with a clear error.
"""

from __future__ import annotations

import os
import time
import uuid as uuidlib
import zlib
from dataclasses import dataclass
from pathlib import Path

from repctl import uapi
from repctl.errors import ReplError

BLOCK = uapi.REPL_META_BLOCK_SIZE
BITS_PER_BLOCK = BLOCK * 8

#: Default bitmap granularity.  4 KiB matches the block size of ext4 and XFS,
#: so a resync moves exactly the blocks that changed; the cost is 32 MiB of
#: bitmap per TiB on the metadata device and, twice, in kernel memory.
DEFAULT_CHUNK_SECTORS = 8


class MetadataError(ReplError):
    """The metadata device is missing, too small, foreign or damaged."""


@dataclass(frozen=True)
class Superblock:
    uuid: str
    data_sectors: int
    chunk_sectors: int
    nr_chunks: int
    bitmap_blocks: int
    clean: bool
    format_time: int
    mount_count: int


def geometry(data_sectors: int, chunk_sectors: int) -> tuple[int, int]:
    """Return (nr_chunks, bitmap_blocks) for a data device and chunk size."""
    if chunk_sectors < uapi.REPL_MIN_CHUNK_SECTORS or chunk_sectors > uapi.REPL_MAX_CHUNK_SECTORS \
            or chunk_sectors & (chunk_sectors - 1):
        raise MetadataError(
            f"chunk size {chunk_sectors * 512} bytes: expected a power of two from "
            f"{uapi.REPL_MIN_CHUNK_SECTORS * 512} to {uapi.REPL_MAX_CHUNK_SECTORS * 512} bytes")
    if data_sectors <= 0:
        raise MetadataError(f"data size {data_sectors} sectors: expected a positive size")
    nr_chunks = -(-data_sectors // chunk_sectors)
    return nr_chunks, -(-nr_chunks // BITS_PER_BLOCK)


def metadata_bytes(data_sectors: int, chunk_sectors: int = DEFAULT_CHUNK_SECTORS) -> int:
    """Size the metadata device needs for this data size and chunk size."""
    return BLOCK * (uapi.REPL_BITMAP_START_BLOCK + geometry(data_sectors, chunk_sectors)[1])


def device_bytes(path: str | Path) -> int:
    """Size in bytes of a block device or regular file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _checksum(block: bytes | bytearray) -> int:
    return zlib.crc32(bytes(block[4:BLOCK]))


def parse_superblock(block: bytes | bytearray) -> Superblock | None:
    """Decode block 0; None if it is all zeros (not formatted).

    Raises MetadataError for anything that is not a valid dm-repl superblock.
    """
    if not any(block):
        return None
    sb = uapi.ffi.new("struct repl_superblock *")
    size = uapi.ffi.sizeof(sb[0])
    uapi.ffi.memmove(sb, bytes(block[:size]), size)
    if sb.magic != uapi.REPL_SB_MAGIC:
        raise MetadataError("not dm-repl metadata (bad magic)")
    if sb.csum != _checksum(block):
        raise MetadataError("superblock checksum mismatch")
    if sb.version != uapi.REPL_META_VERSION:
        raise MetadataError(f"unsupported metadata version {sb.version}")
    return Superblock(
        uuid=str(uuidlib.UUID(bytes=bytes(uapi.ffi.buffer(sb.uuid)))),
        data_sectors=sb.data_sectors, chunk_sectors=sb.chunk_sectors, nr_chunks=sb.nr_chunks,
        bitmap_blocks=sb.bitmap_blocks, clean=bool(sb.flags & uapi.REPL_SB_CLEAN),
        format_time=sb.format_time, mount_count=sb.mount_count)


def build_superblock(data_sectors: int, chunk_sectors: int, uuid: str | None = None) -> bytes:
    """Encode a fresh, clean superblock block (4 KiB) with its checksum."""
    nr_chunks, bitmap_blocks = geometry(data_sectors, chunk_sectors)
    sb = uapi.ffi.new("struct repl_superblock *")
    sb.magic = uapi.REPL_SB_MAGIC
    sb.version = uapi.REPL_META_VERSION
    sb.flags = uapi.REPL_SB_CLEAN
    uapi.ffi.memmove(sb.uuid, uuidlib.UUID(uuid).bytes if uuid else uuidlib.uuid4().bytes, 16)
    sb.data_sectors = data_sectors
    sb.nr_chunks = nr_chunks
    sb.chunk_sectors = chunk_sectors
    sb.bitmap_blocks = bitmap_blocks
    sb.format_time = int(time.time())
    block = bytearray(BLOCK)
    raw = bytes(uapi.ffi.buffer(sb))
    block[: len(raw)] = raw
    block[0:4] = _checksum(block).to_bytes(4, "little")
    return bytes(block)


def _read_uncached(path: str | Path, offset: int, length: int) -> bytes:
    """Read what is on the device, not what this host's page cache remembers.

    The kernel target writes its metadata with bios that bypass the block
    device's page cache, so a buffered read could return stale bytes.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def read_superblock(path: str | Path) -> Superblock | None:
    """Read and validate block 0 of a metadata device (None if unformatted)."""
    block = _read_uncached(path, 0, BLOCK)
    if len(block) < BLOCK:
        raise MetadataError(f"{path}: too small to hold a superblock")
    try:
        return parse_superblock(block)
    except MetadataError as e:
        raise MetadataError(f"{path}: {e}") from None


def format_metadata(path: str | Path, data_sectors: int,
                    chunk_sectors: int = DEFAULT_CHUNK_SECTORS, *,
                    all_dirty: bool = False, force: bool = False, uuid: str | None = None) -> Superblock:
    """Write a superblock and an empty (or, with all_dirty, full) bitmap.

    Refuses a device that already holds dm-repl metadata or anything else
    non-zero in block 0 unless force is given, and a device too small for
    the bitmap.  Everything is on stable storage when this returns.
    """
    need = metadata_bytes(data_sectors, chunk_sectors)
    have = device_bytes(path)
    if have < need:
        raise MetadataError(f"{path}: metadata device holds {have} bytes, needs {need} "
                            f"for {data_sectors * 512} bytes of data in {chunk_sectors * 512}-byte chunks")
    if not force:
        first = _read_uncached(path, 0, BLOCK)
        if any(first):
            try:
                existing = parse_superblock(first)
                what = f"dm-repl metadata (uuid {existing.uuid})" if existing else "data"
            except MetadataError:
                what = "data that is not dm-repl metadata"
            raise MetadataError(f"{path}: already holds {what}; use force to overwrite")
    nr_chunks, bitmap_blocks = geometry(data_sectors, chunk_sectors)
    block0 = build_superblock(data_sectors, chunk_sectors, uuid)
    fd = os.open(path, os.O_WRONLY)
    try:
        bitmap = bytearray(bitmap_blocks * BLOCK)
        if all_dirty:
            full, rest = divmod(nr_chunks, 8)
            bitmap[:full] = b"\xff" * full
            if rest:
                bitmap[full] = (1 << rest) - 1
        os.pwrite(fd, bitmap, BLOCK * uapi.REPL_BITMAP_START_BLOCK)
        os.pwrite(fd, block0, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    sb = parse_superblock(block0)
    assert sb is not None
    return sb


def clear_bitmap(path: str | Path) -> None:
    """Zero the on-disk dirty bitmap of formatted metadata that no device is using, durably.
    The superblock stays as it is."""
    sb = read_superblock(path)
    if sb is None:
        raise MetadataError(f"{path}: not formatted")
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes(-(-sb.nr_chunks // 8)), BLOCK * uapi.REPL_BITMAP_START_BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bitmap(path: str | Path) -> tuple[Superblock, bytes]:
    """Return the superblock and the on-disk bitmap bytes (nr_chunks bits)."""
    sb = read_superblock(path)
    if sb is None:
        raise MetadataError(f"{path}: not formatted")
    return sb, _read_uncached(path, BLOCK * uapi.REPL_BITMAP_START_BLOCK, -(-sb.nr_chunks // 8))
