"""Compression of the stream's data frames (WRITE, RESYNC_CHUNK): the codecs, their bounded
decompression and the counters (docs/protocol.md, "Compression").

The codec is chosen per target in the configuration (`compression`), offered by the source in
its HELLO and accepted by the target in its own; repctl.protocol applies it per frame. This
module knows the codecs only, not the frames.

The codec libraries (`zstandard`, `lz4`) are imported on first use, by a connection that
negotiated them: the CLI and a daemon without compression never load them.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from enum import IntEnum
from types import ModuleType
from typing import Any, TypeAlias

from repctl.errors import ProtocolError

Buffer: TypeAlias = bytes | bytearray | memoryview

__all__ = ["ZSTD_DEFAULT_LEVEL", "ZSTD_LEVELS", "Codec", "CompressionStats", "Compressor",
           "Decompressor", "available", "pays"]

ZSTD_LEVELS = range(1, 20)  # zstd's levels without its --ultra ones (their windows are larger)
ZSTD_DEFAULT_LEVEL = 3
# zstd's window: a frame never needs more than the largest data it holds (MAX_DATA, 16 MiB), so
# a peer cannot make this side allocate a larger one (zstd's own limit is 128 MiB)
ZSTD_MAX_WINDOW = 16 << 20


class Codec(IntEnum):
    """A codec of the stream's data frames. The numbers go into HELLO: never change or reuse one."""

    NONE = 0
    LZ4 = 1  # LZ4 block format (no frame), at its default speed (acceleration 1)
    ZSTD = 2  # one Zstandard frame, its content size in its header

    @property
    def word(self) -> str:
        """The codec as the configuration and `repctl status` write it: none, lz4, zstd."""
        return self.name.lower()


_MODULES = {Codec.LZ4: "lz4.block", Codec.ZSTD: "zstandard"}
_imported: dict[Codec, ModuleType | None] = {}
_import_lock = threading.Lock()


def _module(codec: Codec) -> ModuleType | None:
    """The codec's library, imported once; None if it cannot be imported."""
    with _import_lock:
        if codec not in _imported:
            try:
                _imported[codec] = importlib.import_module(_MODULES[codec])
            except ImportError:
                _imported[codec] = None
        return _imported[codec]


def _load(codec: Codec, verb: str) -> ModuleType:
    """The library that a Compressor (`verb` "compress") or Decompressor ("decompress") of
    `codec` needs; ProtocolError if it does not import."""
    if codec is Codec.NONE:
        raise ValueError(f"no {verb}or for Codec.NONE")
    mod = _module(codec)
    if mod is None:
        raise ProtocolError(f"cannot {verb} {codec.word}: the {_MODULES[codec]} package is not "
                            "installed")
    return mod


def available(codec: int) -> bool:
    """Whether this side can use `codec` (a number from a peer, maybe unknown): NONE always; the
    others if their library imports."""
    if codec == Codec.NONE:
        return True
    return codec in set(Codec) and _module(Codec(codec)) is not None


def pays(raw: int, compressed: int) -> bool:
    """Whether `compressed` bytes are worth sending for `raw`: at most 7/8 of them. Data that
    does not compress that well (random, encrypted, already compressed) goes as it is, so the
    receiver does not spend time decompressing what saved the link almost nothing."""
    return compressed <= raw - raw // 8


@dataclass
class CompressionStats:
    """Counters of the data frames (WRITE, RESYNC_CHUNK) of the connections that negotiated a
    codec, in bytes of the data after each frame's fixed head:

    `raw_bytes`: the data as written (before compression); `wire_bytes`: what went on the wire
    for it (compressed, or `raw` where compression did not pay); `skipped_bytes`: of raw_bytes,
    the data sent uncompressed because it did not compress to 7/8 or less. One object may serve
    many connections in turn (a link's, a target's): counters since the daemon started."""

    raw_bytes: int = 0
    wire_bytes: int = 0
    skipped_bytes: int = 0

    def count(self, raw: int, wire: int, skipped: bool) -> None:
        self.raw_bytes += raw
        self.wire_bytes += wire
        if skipped:
            self.skipped_bytes += raw


class Compressor:
    """Compresses the data of one connection's frames, one frame at a time (not thread-safe:
    the connection's send lock serialises it)."""

    def __init__(self, codec: Codec, level: int = 0) -> None:
        mod = _load(codec, "compress")
        self.codec = codec
        if codec is Codec.ZSTD:
            level = level or ZSTD_DEFAULT_LEVEL
            if level not in ZSTD_LEVELS:
                raise ValueError(f"zstd level {level} (1 to 19)")
            # one frame per data frame, its content size in the header (the receiver checks it)
            self._zstd: Any = mod.ZstdCompressor(level=level, write_content_size=True)
        else:
            self._lz4: Any = mod
        self.level = level

    def compress(self, data: Buffer) -> bytes:
        if self.codec is Codec.ZSTD:
            return bytes(self._zstd.compress(data))
        return bytes(self._lz4.compress(data, mode="default", store_size=False))


class Decompressor:
    """Decompresses the data of one connection's frames, never into more bytes than the frame
    declares (at most `limit`), whatever the compressed data says: a forged or corrupt frame, or
    a "decompression bomb", is a ProtocolError, and nothing larger is ever allocated."""

    def __init__(self, codec: Codec, limit: int) -> None:
        mod = _load(codec, "decompress")
        self.codec = codec
        self.limit = limit
        self._mod: Any = mod
        self._zstd: Any = (mod.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
                           if codec is Codec.ZSTD else None)
        # what the library raises on bad data (zstandard.ZstdError, lz4.block.LZ4BlockError)
        self._errors: tuple[type[Exception], ...] = (
            mod.ZstdError if codec is Codec.ZSTD else mod.LZ4BlockError, ValueError)

    def decompress(self, data: Buffer, size: int, what: str) -> bytes:
        """`data` decompressed: exactly `size` bytes (the size the frame declares, at most
        `limit`), else ProtocolError naming `what` (the frame)."""
        if not 0 < size <= self.limit:
            raise ProtocolError(f"{what} declares {size} bytes of data, not 1 to {self.limit}")
        try:
            if self.codec is Codec.ZSTD:
                # zstd sizes its output from the frame's header and ignores any bound when the
                # header gives one: check that it is exactly the declared size first
                claimed = self._mod.frame_content_size(data)
                if claimed != size:
                    raise ProtocolError(
                        f"{what} declares {size} bytes but its zstd frame says "
                        + ("nothing of its size" if claimed < 0 else f"{claimed}"))
                out = self._zstd.decompress(data, max_output_size=size, read_across_frames=False,
                                            allow_extra_data=False)
            else:
                out = self._mod.decompress(data, uncompressed_size=size)
        except self._errors as exc:
            raise ProtocolError(f"{what}: its {self.codec.word} data does not decompress: "
                                f"{exc}") from None
        if len(out) != size:
            raise ProtocolError(f"{what} declares {size} bytes but its {self.codec.word} data "
                                f"holds {len(out)}")
        return bytes(out) if not isinstance(out, bytes) else out


def reset_imports() -> None:
    """Forget which codec libraries imported (tests that hide one)."""
    with _import_lock:
        _imported.clear()
