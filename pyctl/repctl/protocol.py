"""The repctl wire protocol, version 3: framing, payloads and the handshake, declared as data.

docs/protocol.md is the reference for everything here; the two must agree. Rules that keep peers of
different releases talking:

- frame type, refusal, error and record numbers are fixed forever: new ones are appended, none is
  reused;
- the 32-byte frame header, and the layouts of HELLO (its fixed part and names; a version may
  append fields after them) and REFUSE, never change, so that any two versions can at least
  refuse each other with a clear reason;
- every other layout belongs to a protocol version; a changed layout means a new version.

Every frame is a fixed little-endian header followed by ``length`` payload bytes::

    offset size field     meaning
         0    4 magic     b"RPL1" (0x314c5052 read as u32 LE)
         4    2 version   PROTOCOL_VERSION of the sender
         6    2 type      a FrameType
         8    4 flags     FLAG_MAC on every frame after the handshake, else 0; FLAG_COMPRESSED
                          on a RECORDS, WRITE or RESYNC_CHUNK compressed (repctl.compress)
        12    4 length    payload bytes that follow the header (at most MAX_PAYLOAD)
        16    8 seq       per-connection, per-direction frame number: 1, 2, 3, ...
        24    4 crc       zlib.crc32 of the header with this field zero, then of the payload;
                          0 in a frame with FLAG_MAC, whose tag protects it instead
        28    4 reserved  must be 0

A frame with FLAG_MAC is followed by a 16-byte Poly1305 tag over its header and payload, under a
per-frame key derived from the session's key for that direction (repctl.mac): from the WELCOME on,
nothing that the peer did not send is accepted, and the strict sequence numbers refuse replayed,
dropped and reordered frames.

A session may compress the data of its RECORDS, WRITE and RESYNC_CHUNK frames with the codec
that the handshake negotiated (HELLO's `compression`): the sender compresses each frame's data and
sets FLAG_COMPRESSED, or sends it as it is when it does not compress to 7/8 or less; the tag covers
the frame as sent (compressed), and the receiver decompresses only after the tag is verified, into
at most the size the frame declares, then hands the plain payload to the decoders.

Performance: `FramedConnection.send` takes the payload as several buffers and hands them to
``socket.sendmsg`` with the header, so a large record's data (a memoryview of the kernel ring) is
never copied (the source copies small ones into its RECORDS frame: fewer buffers to tag and
send); `FramedConnection.recv` reads the payload with ``recv_into`` into one reused buffer. Over
TLS (repctl.tls, below the framing) there is no sendmsg: small pieces are gathered into one send.
A session without compression pays one test per frame for it, nothing else.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import itertools
import re
import secrets
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import ClassVar, NamedTuple, NoReturn, Protocol, TypeAlias

from repctl.compress import Codec, CompressionStats, Compressor, Decompressor, available, pays
from repctl.errors import AuthError, ConnectionClosed, HandshakeRefused, ProtocolError, ReplError
from repctl.mac import TAG_SIZE, FrameMac

Buffer: TypeAlias = bytes | bytearray | memoryview

PROTOCOL_VERSION = 4  # 2: OUT_OF_SYNC after every handshake; 3: compression (HELLO, a flag);
                      # 4: RECORDS, the stream's records batched
MAGIC = int.from_bytes(b"RPL1", "little")

HEADER = struct.Struct("<IHHIIQII")  # magic, version, type, flags, length, seq, crc, reserved
HEADER_SIZE = HEADER.size  # 32
_CRC_OFFSET = 24
assert HEADER_SIZE == 32

SECTOR_SIZE = 512
MAX_DATA = 16 * 1024 * 1024  # the largest WRITE or RESYNC_CHUNK data
RECORD = struct.Struct("<QQIHH")  # ring seq, sector, length, op, flags: the head of kmod's repl_rec
MAX_PAYLOAD = MAX_DATA + RECORD.size
MAX_TEXT = 1024  # bytes of UTF-8 in REFUSE and ERROR texts
# The largest frame before authentication: a REFUSE with its text (a HELLO needs at most 860).
MAX_HANDSHAKE_PAYLOAD = 2 + MAX_TEXT
FLAG_MAC = 0x1  # header flag: a 16-byte tag follows the payload (docs/protocol.md)
FLAG_COMPRESSED = 0x2  # header flag: the data of this WRITE or RESYNC_CHUNK is compressed
_HEADER_FLAGS = FLAG_MAC | FLAG_COMPRESSED
SESSION_LABEL = b"repl-session-v1"
NONCE_SIZE = 32
MAC_SIZE = 32  # HMAC-SHA256
MAX_HISTORY = 4  # generation identifiers kept in HELLO's history
AUTH_LABEL = b"repl-auth-v1"
HANDSHAKE_TIMEOUT = 10.0  # seconds for the whole handshake, however the peer trickles its bytes
REFUSE_LINGER = 2.0  # seconds a refusing side waits for the peer to read its REFUSE and close

_IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)
# A stream without sendmsg (TLS): pieces below _DIRECT bytes are gathered into sends of up to
# _GATHER bytes, so that a frame's header, record head and tag do not each become a TLS record
_GATHER = 256 * 1024
_DIRECT = 64 * 1024
_TLS_RECORD = b"\x16\x03"  # how a TLS handshake starts: a peer with TLS talking to one without


class FrameType(IntEnum):
    """Frame types. The numbers are part of the protocol: never change or reuse one."""

    # handshake
    HELLO = 1
    CHALLENGE_RESPONSE = 2
    WELCOME = 3
    REFUSE = 4
    # the replication stream (source -> target), in ring order
    WRITE = 16
    FLUSH = 17
    DISCARD = 18
    WRITE_ZEROES = 19
    RECORDS = 21  # consecutive records of any of the four ops in one frame (version 4 on)
    # target -> source
    ACK = 20
    # resync
    RESYNC_CHUNK = 32
    RESYNC_DONE = 33
    CSUM_REQUEST = 34
    CSUM_REPLY = 35
    OUT_OF_SYNC = 36  # target -> source, once per session: the chunks where the two may differ
    # control
    PAUSE = 48
    RESUME = 49
    PING = 50
    PONG = 51
    ERROR = 63


class RefuseReason(IntEnum):
    """Why a handshake was refused (REFUSE payload). Never change or reuse a number."""

    PROTOCOL = 1  # malformed or unexpected handshake frame
    VERSION = 2  # protocol version not supported
    UNKNOWN_RESOURCE = 3
    UNEXPECTED_NODE = 4
    AUTH_FAILED = 5
    DEVICE_TOO_SMALL = 6
    CHUNK_SIZE_MISMATCH = 7
    ROLE_CONFLICT = 8  # both sides claim the same role
    SPLIT_BRAIN = 9  # data generations diverged (refused by the daemon's policy check)
    BUSY = 10  # the resource already has a connection to this peer
    POLICY = 11  # any other refusal by local policy


class ErrorCode(IntEnum):
    """ERROR codes: the sender reports why it is about to close. Never change or reuse a number."""

    INTERNAL = 1
    IO_ERROR = 2
    NO_SPACE = 3
    BAD_REQUEST = 4
    SHUTDOWN = 5
    SPLIT_BRAIN = 6  # the source found the target's data diverged and refuses it (after the report)


class Role(IntEnum):
    """A side's role in the resource. The source connects; the target listens."""

    SOURCE = 1
    TARGET = 2


class RecordOp(IntEnum):
    """The op of a stream record. Same numbers as REPL_OP_* in kmod/dm-repl-uapi.h."""

    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4


class RecordFlags(IntFlag):
    """Flags of a stream record. Same bits as REPL_REC_* in kmod/dm-repl-uapi.h."""

    FUA = 1  # the target must make this write durable before acknowledging it as durable


NO_FLAGS = RecordFlags(0)


class AckFlags(IntFlag):
    DURABLE = 1  # the acknowledged records are on stable storage (a flush covering them completed)


class DigestAlgorithm(IntEnum):
    """Chunk checksum of CSUM_REQUEST / CSUM_REPLY."""

    BLAKE2B_256 = 1
    SHA256 = 2

    @property
    def size(self) -> int:
        return 32

    def digest(self, data: Buffer) -> bytes:
        """The digest of `data` with this algorithm."""
        if self is DigestAlgorithm.BLAKE2B_256:
            return hashlib.blake2b(data, digest_size=32).digest()
        return hashlib.sha256(data).digest()


_RECORD_FRAME = {
    RecordOp.WRITE: FrameType.WRITE,
    RecordOp.FLUSH: FrameType.FLUSH,
    RecordOp.DISCARD: FrameType.DISCARD,
    RecordOp.WRITE_ZEROES: FrameType.WRITE_ZEROES,
}
_FRAME_RECORD = {v: k for k, v in _RECORD_FRAME.items()}
_RECORD_OPS = {int(op): op for op in RecordOp}
_RECORD_FLAGS = {0: NO_FLAGS, int(RecordFlags.FUA): RecordFlags.FUA}

# Frame types whose layout is frozen across versions: accepted whatever the header's version says.
_VERSIONLESS = frozenset({FrameType.HELLO, FrameType.REFUSE})

# Frame types whose data a session may compress, and the size of the fixed head before their data
# (a WRITE's record, a RESYNC_CHUNK's chunk index), which is never compressed.
_COMPRESSIBLE = {FrameType.WRITE: RECORD.size, FrameType.RESYNC_CHUNK: 8, FrameType.RECORDS: 0}
# A compressed RESYNC_CHUNK has, after its chunk index, the size of its data uncompressed (u32)
# and a reserved u32 (0): the last chunk of a device may be short, so the size is not implied.
# A compressed RECORDS frame starts with the same 8 bytes: its whole payload is compressed.
_ZCHUNK = struct.Struct("<II")


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------


class Header(NamedTuple):
    magic: int
    version: int
    type: int
    flags: int
    length: int
    seq: int
    crc: int
    reserved: int


class Frame(NamedTuple):
    """A received frame. `payload` is valid only until the next `recv` on the same connection."""

    type: FrameType
    header: Header
    payload: memoryview


def _bytes_view(part: Buffer) -> memoryview:
    view = memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def encode_frame(
    frame_type: int,
    seq: int,
    parts: Sequence[Buffer],
    *,
    version: int = PROTOCOL_VERSION,
    mac: FrameMac | None = None,
    flags: int = 0,
) -> list[memoryview]:
    """The buffers of one frame: its 32-byte header, then `parts` unchanged (not copied), then,
    with `mac`, the frame's tag (FLAG_MAC set, crc 0). `flags`: other header flags
    (FLAG_COMPRESSED).

    Raises ValueError if the payload exceeds MAX_PAYLOAD.
    """
    views = [_bytes_view(p) for p in parts]
    length = sum(v.nbytes for v in views)
    if length > MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds the maximum {MAX_PAYLOAD}")
    flags |= FLAG_MAC if mac is not None else 0
    header = memoryview(bytearray(HEADER.pack(MAGIC, version, frame_type, flags, length, seq, 0, 0)))
    if mac is not None:
        return [header, *views, memoryview(mac.tag(seq, [header, *views]))]
    crc = zlib.crc32(header)
    for v in views:
        crc = zlib.crc32(v, crc)
    struct.pack_into("<I", header, _CRC_OFFSET, crc)
    return [header, *views]


def _frame_name(frame_type: int) -> str:
    try:
        return FrameType(frame_type).name
    except ValueError:
        return str(frame_type)


class Stream(Protocol):
    """What FramedConnection needs of its connection: a connected socket.socket, or a
    repctl.tls.TLSSocket (TLS, which has no sendmsg)."""

    def sendall(self, data: Buffer, /) -> None: ...
    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int: ...
    def recv(self, bufsize: int, /) -> bytes: ...
    def settimeout(self, value: float | None, /) -> None: ...
    def gettimeout(self) -> float | None: ...
    def shutdown(self, how: int, /) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...


class FramedConnection:
    """Frames over a connected stream socket, validated on receipt.

    Each direction numbers its frames 1, 2, 3, ...; `recv` raises ProtocolError on a bad magic,
    version, type, flags, length, crc, tag or sequence, and on a truncated frame. After a
    ProtocolError, or an OSError or timeout in the middle of a frame, the connection is unusable:
    close it. A timeout while waiting for the first byte of a frame leaves it usable.

    The handshake turns on frame authentication (`authenticate`): from then on every frame sent
    carries a tag, and a received frame without a valid one is a ProtocolError. `deadline` (a
    time.monotonic() value) bounds every receive, however slowly the peer sends.

    The handshake also sets the session's codec (`set_compression`): from then on the data of
    WRITE and RESYNC_CHUNK frames is compressed when it pays, and compressed frames are accepted;
    `compression_stats` (one object may serve the connections of a link in turn) counts them.

    `send` may be called from several threads (it holds a lock); `recv` from one thread at a time.
    """

    def __init__(self, sock: Stream, *, max_payload: int = MAX_PAYLOAD,
                 compression_stats: CompressionStats | None = None) -> None:
        self.sock = sock
        self.max_payload = max_payload
        self._send_lock = threading.Lock()
        self._send_seq = 0
        self._recv_seq = 0
        self._header = bytearray(HEADER_SIZE)
        self._buffer = bytearray(64 * 1024)
        self._broken: str | None = None
        self._started = False  # some bytes of the frame being received were read
        self._send_broken: str | None = None
        # the plain path: one sendmsg of every buffer; TLS streams have no sendmsg
        self._sendmsg: socket.socket | None = (
            sock if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket) else None
        )
        self._send_mac: FrameMac | None = None
        self._recv_mac: FrameMac | None = None
        self._tag = bytearray(TAG_SIZE)
        self.deadline: float | None = None
        self.plain_refuse_ok = False  # the handshake accepts a REFUSE without a tag
        self.codec = Codec.NONE  # the session's, set by the handshake
        self.compression_stats = (compression_stats if compression_stats is not None
                                  else CompressionStats())
        self._compressor: Compressor | None = None
        self._decompressor: Decompressor | None = None
        self._zbuffer = bytearray(0)  # a compressed payload, before it is decompressed

    def set_compression(self, codec: Codec, level: int = 0) -> None:
        """Use `codec` for the data frames of this connection, both ways: compress what this
        side sends (zstd at `level`, 0 for its default), accept compressed frames. NONE turns
        it off. The handshake calls it with the negotiated codec."""
        with self._send_lock:
            if codec is Codec.NONE:
                self._compressor = self._decompressor = None
            else:
                self._compressor = Compressor(codec, level)
                self._decompressor = Decompressor(codec, MAX_DATA)
            self.codec = codec

    def authenticate(self, send_key: bytes, recv_key: bytes) -> None:
        """Tag every frame sent from now on with `send_key`'s MAC; require `recv_key`'s on every
        frame received."""
        with self._send_lock:
            self._send_mac = FrameMac(send_key)
        self._recv_mac = FrameMac(recv_key)

    @property
    def authenticated(self) -> bool:
        return self._recv_mac is not None

    # ---- sending

    @property
    def frames_sent(self) -> int:
        return self._send_seq

    @property
    def frames_received(self) -> int:
        return self._recv_seq

    def send(self, frame_type: int, *parts: Buffer) -> int:
        """Send one frame whose payload is the concatenation of `parts`; return its number."""
        return self.send_batch([(frame_type, parts)])

    def send_batch(self, frames: Iterable[tuple[int, Sequence[Buffer]]]) -> int:
        """Send several frames in as few system calls as possible; return the last one's number.

        Use it to stream a range of ring records in one go.
        """
        with self._send_lock:
            if self._send_broken:
                raise ProtocolError(
                    f"connection unusable after an earlier error: {self._send_broken}"
                )
            seq = self._send_seq
            views: list[memoryview] = []
            for frame_type, parts in frames:
                seq += 1
                flags = 0
                if self._compressor is not None and frame_type in _COMPRESSIBLE:
                    flags, parts = self._compress(frame_type, parts)
                views += encode_frame(frame_type, seq, parts, mac=self._send_mac, flags=flags)
            try:
                self._sendall(views)
            except BaseException as exc:
                self._send_broken = str(exc) or type(exc).__name__
                raise
            self._send_seq = seq
            return seq

    def send_message(self, message: Message) -> int:
        """Encode and send a payload dataclass; returns the frame's sequence number."""
        return self.send(message.frame_type, *message.encode())

    def _compress(self, frame_type: int, parts: Sequence[Buffer]) -> tuple[int, Sequence[Buffer]]:
        """The header flags and payload of a data frame as sent: its data compressed if that
        pays (FLAG_COMPRESSED), else `parts` as they are."""
        assert self._compressor is not None
        head_size = _COMPRESSIBLE[FrameType(frame_type)]
        views = [_bytes_view(p) for p in parts]
        if len(views) == 2 and views[0].nbytes == head_size:
            head, data = views  # as Record and ResyncChunk encode: the head, then the data
        else:
            joined = memoryview(b"".join(views))
            head, data = joined[:head_size], joined[head_size:]
        raw = data.nbytes
        if not raw or raw > MAX_DATA:  # MAX_DATA: the most a receiver decompresses
            return 0, parts
        packed = self._compressor.compress(data)
        if not pays(raw, len(packed)):
            self.compression_stats.count(raw, raw, skipped=True)
            return 0, parts
        if frame_type != FrameType.WRITE:  # RESYNC_CHUNK, RECORDS: the size is not implied
            size = _ZCHUNK.pack(raw, 0)
            self.compression_stats.count(raw, len(size) + len(packed), skipped=False)
            return FLAG_COMPRESSED, (head, size, packed)
        self.compression_stats.count(raw, len(packed), skipped=False)
        return FLAG_COMPRESSED, (head, packed)

    def _sendall(self, views: list[memoryview]) -> None:
        sock = self._sendmsg
        if sock is None:
            self._sendall_gathered(views)
            return
        pending = collections.deque(v for v in views if v.nbytes)
        while pending:
            sent = sock.sendmsg(itertools.islice(pending, _IOV_MAX))
            while sent:
                first = pending[0]
                if sent >= first.nbytes:
                    sent -= first.nbytes
                    pending.popleft()
                else:
                    pending[0] = first[sent:]
                    sent = 0

    def _sendall_gathered(self, views: list[memoryview]) -> None:
        """Send `views` on a stream without sendmsg (TLS): small pieces (headers, record heads,
        tags, small writes) copied together into sends of up to _GATHER bytes, large ones sent
        as they are, so that TLS makes few full records rather than one per piece."""
        gathered = bytearray()
        for v in views:
            if v.nbytes >= _DIRECT:
                if gathered:
                    self.sock.sendall(gathered)
                    gathered = bytearray()
                self.sock.sendall(v)
                continue
            gathered += v
            if len(gathered) >= _GATHER:
                self.sock.sendall(gathered)
                gathered = bytearray()
        if gathered:
            self.sock.sendall(gathered)

    # ---- receiving

    def recv(self, buffer: bytearray | memoryview | None = None) -> Frame:
        """Receive and validate the next frame.

        The payload is read straight into `buffer` if it is given and large enough, else into the
        connection's own buffer; either way `Frame.payload` is a view that the next `recv` may
        overwrite. Raises ConnectionClosed on an orderly EOF between frames, ProtocolError on any
        defect.
        """
        if self._broken:
            raise ProtocolError(f"connection unusable after an earlier error: {self._broken}")
        self._started = False
        try:
            return self._recv(buffer)
        except BaseException as exc:
            if self._started or isinstance(exc, ProtocolError):
                self._broken = str(exc) or type(exc).__name__
            raise

    def _read(self, view: memoryview, what: str) -> None:
        got = 0
        need = view.nbytes
        while got < need:
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"deadline passed with {got} of {need} {what} bytes read")
                self.sock.settimeout(left)
            n = self.sock.recv_into(view[got:], need - got)
            if n == 0:
                if got == 0 and what == "header":
                    raise ConnectionClosed("the peer closed the connection")
                raise ProtocolError(
                    f"truncated frame: expected {need} {what} bytes, got {got} before EOF"
                )
            got += n
            self._started = True

    def _recv(self, buffer: bytearray | memoryview | None) -> Frame:
        hview = memoryview(self._header)
        self._read(hview, "header")
        header = Header._make(HEADER.unpack(self._header))
        if header.magic != MAGIC:
            if self._header.startswith(_TLS_RECORD):
                raise ProtocolError(
                    "the peer speaks TLS and this node has no tls configured: configure tls on "
                    "both nodes (a TLS handshake where a frame was expected)"
                )
            raise ProtocolError(
                f"bad magic {bytes(self._header[:4])!r}, expected b'RPL1' "
                "(the peer does not speak this protocol, or the stream is out of step)"
            )
        if header.length > self.max_payload:
            raise ProtocolError(
                f"frame length {header.length} exceeds the maximum {self.max_payload} "
                f"(frame {header.seq}, type {_frame_name(header.type)})"
            )
        if header.flags & ~_HEADER_FLAGS or header.reserved:
            raise ProtocolError(
                f"frame {header.seq} has unknown header flags {header.flags:#x} or a non-zero "
                f"reserved field {header.reserved:#x}"
            )
        tagged = bool(header.flags & FLAG_MAC)
        if tagged and self._recv_mac is None:
            raise ProtocolError(f"frame {header.seq} carries a MAC before the handshake set a key")
        if (
            not tagged
            and self._recv_mac is not None
            and not (self.plain_refuse_ok and header.type == FrameType.REFUSE)
        ):
            raise ProtocolError(
                f"frame {header.seq} ({_frame_name(header.type)}) carries no MAC: only "
                "authenticated frames are accepted after the handshake"
            )
        compressed = bool(header.flags & FLAG_COMPRESSED)
        if compressed:  # read aside: it is decompressed into the payload's buffer, below
            if len(self._zbuffer) < header.length:
                self._zbuffer = bytearray(header.length)
            payload = memoryview(self._zbuffer)[: header.length]
        else:
            payload = self._payload_view(header.length, buffer)
        self._read(payload, "payload")

        if tagged:
            assert self._recv_mac is not None
            tag = memoryview(self._tag)
            self._read(tag, "tag")
            if header.crc:
                raise ProtocolError(f"frame {header.seq} has both a MAC and a crc")
            want = self._recv_mac.tag(header.seq, [memoryview(self._header), payload])
            if not hmac.compare_digest(want, tag):
                raise ProtocolError(
                    f"bad MAC in frame {header.seq} ({_frame_name(header.type)}, "
                    f"{header.length} bytes): forged, replayed or corrupted on the way"
                )
        else:
            struct.pack_into("<I", self._header, _CRC_OFFSET, 0)
            crc = zlib.crc32(payload, zlib.crc32(self._header))
            if crc != header.crc:
                raise ProtocolError(
                    f"bad crc in frame {header.seq} ({_frame_name(header.type)}, "
                    f"{header.length} bytes): header says {header.crc:#010x}, "
                    f"content gives {crc:#010x}"
                )
        try:
            frame_type = FrameType(header.type)
        except ValueError:
            raise ProtocolError(f"unknown frame type {header.type}") from None
        if header.version != PROTOCOL_VERSION and frame_type not in _VERSIONLESS:
            raise ProtocolError(
                f"unsupported protocol version {header.version} in frame {header.seq} "
                f"(this side speaks {PROTOCOL_VERSION})"
            )
        expected = self._recv_seq + 1
        if header.seq != expected:
            raise ProtocolError(f"unexpected frame sequence {header.seq}, expected {expected}")
        self._recv_seq = expected
        if compressed:
            payload = self._inflate(frame_type, header, payload, buffer)
        elif self._decompressor is not None and frame_type in _COMPRESSIBLE:
            raw = max(payload.nbytes - _COMPRESSIBLE[frame_type], 0)
            self.compression_stats.count(raw, raw, skipped=True)
        return Frame(frame_type, header, payload)

    def _inflate(self, frame_type: FrameType, header: Header, wire: memoryview,
                 buffer: bytearray | memoryview | None) -> memoryview:
        """The plain payload of a compressed frame (authenticated already): its fixed head, then
        its data decompressed into exactly the size it declares, at most MAX_DATA."""
        what = f"compressed frame {header.seq} ({frame_type.name}, {header.length} bytes)"
        if self._decompressor is None:
            raise ProtocolError(f"{what}: this session negotiated no compression")
        head_size = _COMPRESSIBLE.get(frame_type)
        if head_size is None:
            raise ProtocolError(f"{what}: only WRITE, RECORDS and RESYNC_CHUNK frames may be "
                                "compressed")
        if frame_type is FrameType.WRITE:
            _need(wire, RECORD.size, what, exact=False)
            size = RECORD.unpack_from(wire)[2]
            data = wire[RECORD.size :]
        else:
            _need(wire, head_size + _ZCHUNK.size, what, exact=False)
            size, reserved = _ZCHUNK.unpack_from(wire, head_size)
            if reserved:
                raise ProtocolError(f"{what}: reserved field {reserved:#x}, expected 0")
            data = wire[head_size + _ZCHUNK.size :]
        plain = self._decompressor.decompress(data, size, what)
        out = self._payload_view(head_size + size, buffer)
        out[:head_size] = wire[:head_size]
        out[head_size:] = plain
        self.compression_stats.count(size, wire.nbytes - head_size, skipped=False)
        return out

    def _payload_view(self, length: int, buffer: bytearray | memoryview | None) -> memoryview:
        if buffer is not None:
            view = _bytes_view(buffer)
            if view.nbytes >= length:
                return view[:length]
        if len(self._buffer) < length:
            # A new buffer rather than a resize: views handed out earlier stay valid.
            self._buffer = bytearray(min(max(length, 2 * len(self._buffer)), self.max_payload))
        return memoryview(self._buffer)[:length]

    def recv_message(self) -> Message:
        """Receive a frame and decode its payload (a WRITE's data stays a view into the buffer)."""
        frame = self.recv()
        return decode(frame.type, frame.payload)

    # ---- ending

    def linger(self, timeout: float = REFUSE_LINGER) -> None:
        """Stop sending and discard what the peer still sends until it closes or `timeout` passes.

        Called after a REFUSE so that closing our socket with unread data (which makes the kernel
        send a reset) cannot destroy the REFUSE before the peer has read it.
        """
        deadline = time.monotonic() + timeout
        old = self.sock.gettimeout()
        try:
            self.sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(65536):
                    break
        except (OSError, ReplError):  # ReplError: a TLS stream's (repctl.tls)
            pass
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(old)

    def close(self) -> None:
        """Close now: shut down first, so that a thread blocked in recv wakes and the peer sees EOF."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


# --------------------------------------------------------------------------------------------
# Payloads: one frozen dataclass per frame type (Record serves the four stream record types).
# encode() returns the payload as buffers (not copied); decode() validates and raises ProtocolError.
# --------------------------------------------------------------------------------------------


class Message:
    """Base of the payload dataclasses."""

    FRAME_TYPE: ClassVar[FrameType]

    @property
    def frame_type(self) -> FrameType:
        return self.FRAME_TYPE

    def encode(self) -> tuple[Buffer, ...]:
        raise NotImplementedError

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType) -> Message:
        raise NotImplementedError


def _need(payload: memoryview, size: int, what: str, *, exact: bool = True) -> None:
    n = payload.nbytes
    if n < size or (exact and n != size):
        want = f"{size}" if exact else f"at least {size}"
        raise ProtocolError(f"{what} payload has {n} bytes, expected {want}")


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def _encode_text(text: str) -> bytes:
    data = text.encode("utf-8")[:MAX_TEXT]
    return data.decode("utf-8", "ignore").encode("utf-8")


def _decode_text(data: memoryview, what: str) -> str:
    if data.nbytes > MAX_TEXT:
        raise ProtocolError(f"{what} text has {data.nbytes} bytes, at most {MAX_TEXT} allowed")
    return _printable(bytes(data).decode("utf-8", "replace"))


def _enum_or_int(enum: type[IntEnum], value: int) -> int:
    try:
        return enum(value)
    except ValueError:
        return value  # a number from a newer peer: kept, shown as a number


_WIRE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")


@dataclass(frozen=True)
class Generations:
    """Data generation identifiers of a node (see docs/protocol.md, "Data generations").

    `current` identifies the data the node holds now (0: none yet); `history` the generations it
    held before, newest first, at most MAX_HISTORY, none of them 0.
    """

    current: int
    history: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.history) > MAX_HISTORY:
            raise ValueError(f"at most {MAX_HISTORY} history generations, got {len(self.history)}")
        for g in (self.current, *self.history):
            if not 0 <= g < 2**64:
                raise ValueError(f"generation {g} is not a u64")
        if 0 in self.history:
            raise ValueError("a history generation cannot be 0")


@dataclass(frozen=True)
class Hello(Message):
    """HELLO: who the sender is and what it holds. The fixed part and the three names are frozen
    across versions; from version 3 on, TRAILER follows the names: the source's compression
    offer (a Codec), or the target's answer to it (the offer, or NONE). A HELLO of version 2
    (none) still decodes, with `compression` NONE."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.HELLO
    FIXED: ClassVar[struct.Struct] = struct.Struct(f"<HBBIQQ{MAX_HISTORY}Q{NONCE_SIZE}s")
    TRAILER: ClassVar[struct.Struct] = struct.Struct("<B3s")  # compression, 3 bytes reserved (0)

    protocol_version: int
    role: Role
    resource: str
    node: str
    peer: str  # the node the sender expects to talk to
    device_size: int  # bytes
    chunk_size: int  # bytes
    generations: Generations
    nonce: bytes
    compression: int = Codec.NONE  # a Codec (a bare int if the peer knows one we do not)

    def encode(self) -> tuple[Buffer, ...]:
        if len(self.nonce) != NONCE_SIZE:
            raise ValueError(f"the nonce must have {NONCE_SIZE} bytes")
        history = list(self.generations.history) + [0] * (
            MAX_HISTORY - len(self.generations.history)
        )
        out = bytearray(
            self.FIXED.pack(
                self.protocol_version,
                self.role,
                len(self.generations.history),
                self.chunk_size,
                self.device_size,
                self.generations.current,
                *history,
                self.nonce,
            )
        )
        for name in (self.resource, self.node, self.peer):
            data = name.encode("utf-8")
            if not _WIRE_NAME.fullmatch(name) or len(data) > 255:
                raise ValueError(f"{name!r} is not a valid resource or node name")
            out += bytes([len(data)]) + data
        if self.protocol_version >= 3:
            out += self.TRAILER.pack(self.compression, bytes(3))
        elif self.compression:
            raise ValueError("a HELLO of version 2 has no compression field")
        return (bytes(out),)

    @staticmethod
    def peek_version(payload: memoryview) -> int:
        """The protocol version of a HELLO payload of any version."""
        _need(payload, 2, "HELLO", exact=False)
        return int.from_bytes(payload[:2], "little")

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType = FrameType.HELLO) -> Hello:
        _need(payload, cls.FIXED.size, "HELLO", exact=False)
        version, role, count, chunk, size, current, *rest = cls.FIXED.unpack_from(payload)
        history, nonce = rest[:MAX_HISTORY], rest[MAX_HISTORY]
        try:
            role = Role(role)
        except ValueError:
            raise ProtocolError(f"HELLO has an unknown role {role}") from None
        if count > MAX_HISTORY or any(history[count:]) or 0 in history[:count]:
            raise ProtocolError(
                f"HELLO has a malformed generation history {history} ({count} used)"
            )
        names: list[str] = []
        pos = cls.FIXED.size
        for what in ("resource", "node", "peer"):
            if pos >= payload.nbytes:
                raise ProtocolError(f"HELLO is truncated before its {what} name")
            n = payload[pos]
            raw = bytes(payload[pos + 1 : pos + 1 + n])
            pos += 1 + n
            name = raw.decode("ascii", "replace")
            if len(raw) != n or not _WIRE_NAME.fullmatch(name):
                raise ProtocolError(f"HELLO has a malformed {what} name {_printable(name)!r}")
            names.append(name)
        compression = 0
        if version >= 3:
            if payload.nbytes - pos != cls.TRAILER.size:
                raise ProtocolError(f"HELLO has {payload.nbytes - pos} bytes after its names, "
                                    f"expected {cls.TRAILER.size}")
            compression, reserved = cls.TRAILER.unpack_from(payload, pos)
            if reserved != bytes(3):
                raise ProtocolError(f"HELLO has non-zero reserved bytes {reserved.hex()}")
            pos += cls.TRAILER.size
        if pos != payload.nbytes:
            raise ProtocolError(f"HELLO has {payload.nbytes - pos} trailing bytes")
        return cls(
            version,
            role,
            names[0],
            names[1],
            names[2],
            size,
            chunk,
            Generations(current, tuple(history[:count])),
            nonce,
            _enum_or_int(Codec, compression),
        )


@dataclass(frozen=True)
class ChallengeResponse(Message):
    """CHALLENGE_RESPONSE: the sender's HMAC-SHA256 proof of the shared secret."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.CHALLENGE_RESPONSE
    mac: bytes

    def encode(self) -> tuple[Buffer, ...]:
        return (self.mac,)

    @classmethod
    def decode(
        cls, payload: memoryview, frame_type: FrameType = FrameType.CHALLENGE_RESPONSE
    ) -> ChallengeResponse:
        _need(payload, MAC_SIZE, "CHALLENGE_RESPONSE")
        return cls(bytes(payload))


class _Empty(Message):
    """A frame without payload."""

    def encode(self) -> tuple[Buffer, ...]:
        return ()

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType) -> Message:
        _need(payload, 0, frame_type.name)
        return cls()


@dataclass(frozen=True)
class Welcome(_Empty):
    """WELCOME: the sender accepts the peer; the handshake is complete on its side."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.WELCOME


@dataclass(frozen=True)
class Pause(_Empty):
    """PAUSE: the source stops streaming to this target and tracks its changes in the bitmap."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.PAUSE


@dataclass(frozen=True)
class Resume(_Empty):
    """RESUME: the source resumes: a resync of the chunks changed while paused follows."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.RESUME


class _Text(Message):
    """REFUSE and ERROR: a u16 code, then UTF-8 text up to the end of the payload."""

    CODES: ClassVar[type[IntEnum]]
    code: int
    text: str

    def encode(self) -> tuple[Buffer, ...]:
        return (struct.pack("<H", self.code) + _encode_text(self.text),)

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType) -> Message:
        _need(payload, 2, frame_type.name, exact=False)
        code = _enum_or_int(cls.CODES, int.from_bytes(payload[:2], "little"))
        return cls(code, _decode_text(payload[2:], frame_type.name))  # type: ignore[call-arg]


@dataclass(frozen=True)
class Refuse(_Text):
    """REFUSE: the sender refuses the handshake and closes. Layout frozen across versions."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.REFUSE
    CODES: ClassVar[type[IntEnum]] = RefuseReason
    code: int  # a RefuseReason (a bare int if the peer is newer)
    text: str

    @property
    def reason(self) -> int:
        return self.code


@dataclass(frozen=True)
class Error(_Text):
    """ERROR: the sender hit an error it cannot recover from on this connection, and closes."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.ERROR
    CODES: ClassVar[type[IntEnum]] = ErrorCode
    code: int  # an ErrorCode (a bare int if the peer is newer)
    text: str


@dataclass(frozen=True)
class Record(Message):
    """WRITE, FLUSH, DISCARD or WRITE_ZEROES: one record of the source's ring, in ring order.

    The 24 bytes before the data are the head of kmod's ``struct repl_rec`` (seq, sector, len, op,
    flags), so a sender may pass the ring's own bytes. `length` is in bytes; only a WRITE has data.
    """

    op: RecordOp
    ring_seq: int
    sector: int = 0
    length: int = 0
    flags: RecordFlags = NO_FLAGS
    data: Buffer = b""

    @property
    def frame_type(self) -> FrameType:
        return _RECORD_FRAME[self.op]

    def encode(self) -> tuple[Buffer, ...]:
        head = RECORD.pack(self.ring_seq, self.sector, self.length, self.op, self.flags)
        return (head, self.data) if self.op == RecordOp.WRITE else (head,)

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType) -> Record:
        name = frame_type.name
        _need(payload, RECORD.size, name, exact=False)
        ring_seq, sector, length, op, flags = RECORD.unpack_from(payload)
        if op != _FRAME_RECORD[frame_type]:
            raise ProtocolError(f"{name} frame carries a record with op {op}")
        return cls._checked(name, ring_seq, sector, length, op, flags, payload[RECORD.size :])

    @classmethod
    def _checked(cls, name: str, ring_seq: int, sector: int, length: int, op: int, flags: int,
                 data: memoryview) -> Record:
        """The record of these fields, checked (`name`: the frame's, for the errors)."""
        op = _RECORD_OPS[op]  # a dict, not RecordOp(op): a RECORDS frame checks thousands
        if flags not in _RECORD_FLAGS:
            raise ProtocolError(f"{name} record {ring_seq} has unknown flags {flags:#x}")
        if op is RecordOp.WRITE:
            if data.nbytes != length:
                raise ProtocolError(
                    f"WRITE record {ring_seq} says {length} bytes but carries {data.nbytes}"
                )
        elif data.nbytes:
            raise ProtocolError(f"{name} record {ring_seq} carries {data.nbytes} data bytes")
        if op is RecordOp.FLUSH:
            if sector or length:
                raise ProtocolError(f"FLUSH record {ring_seq} has a sector or a length")
        elif length == 0 or length % SECTOR_SIZE:
            raise ProtocolError(
                f"{op.name} record {ring_seq} has length {length}, not a positive multiple of 512"
            )
        return cls(op, ring_seq, sector, length, _RECORD_FLAGS[flags], data)


@dataclass(frozen=True)
class Records(Message):
    """RECORDS (version 4 on): consecutive records of the ring in one frame, each its 24-byte
    head (as in a WRITE, FLUSH, DISCARD or WRITE_ZEROES frame), then its data if it is a WRITE.

    One header and one tag for the lot, where a frame per record cost both per record: the
    source streams every record so (docs/protocol.md, "The stream").
    """

    FRAME_TYPE: ClassVar[FrameType] = FrameType.RECORDS
    records: tuple[Record, ...]

    def encode(self) -> tuple[Buffer, ...]:
        return tuple(part for r in self.records for part in r.encode())

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType = FrameType.RECORDS) -> Records:
        records: list[Record] = []
        pos, end = 0, payload.nbytes
        if not end:
            raise ProtocolError("RECORDS frame carries no record")
        while pos < end:
            if end - pos < RECORD.size:
                raise ProtocolError(f"RECORDS frame ends inside a record head ({end - pos} bytes "
                                    f"left of {RECORD.size})")
            ring_seq, sector, length, op, flags = RECORD.unpack_from(payload, pos)
            if op not in _RECORD_OPS:
                raise ProtocolError(f"RECORDS frame carries record {ring_seq} with unknown op {op}")
            if records and ring_seq != records[-1].ring_seq + 1:
                raise ProtocolError(f"RECORDS frame has record {ring_seq} after record "
                                    f"{records[-1].ring_seq}: its records must be consecutive")
            pos += RECORD.size
            size = length if op == RecordOp.WRITE else 0
            if end - pos < size:
                raise ProtocolError(f"RECORDS frame ends inside WRITE record {ring_seq} "
                                    f"({end - pos} of its {length} bytes)")
            records.append(Record._checked("RECORDS", ring_seq, sector, length, op, flags,
                                           payload[pos : pos + size]))
            pos += size
        return cls(tuple(records))


def write_record(ring_seq: int, sector: int, data: Buffer, flags: RecordFlags = NO_FLAGS) -> Record:
    """A WRITE record of `data` (kept as given, not copied) at `sector`."""
    return Record(RecordOp.WRITE, ring_seq, sector, _bytes_view(data).nbytes, flags, data)


@dataclass(frozen=True)
class Ack(Message):
    """ACK: every record up to `ring_seq` is applied on the target (and durable if `durable`)."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.ACK
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QII")  # ring seq, AckFlags, reserved
    ring_seq: int
    durable: bool = False

    def encode(self) -> tuple[Buffer, ...]:
        return (self.LAYOUT.pack(self.ring_seq, AckFlags.DURABLE if self.durable else 0, 0),)

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType = FrameType.ACK) -> Ack:
        _need(payload, cls.LAYOUT.size, "ACK")
        seq, flags, reserved = cls.LAYOUT.unpack(payload)
        if flags & ~int(AckFlags.DURABLE) or reserved:
            raise ProtocolError(f"ACK {seq} has unknown flags {flags:#x} or reserved {reserved:#x}")
        return cls(seq, bool(flags & AckFlags.DURABLE))


@dataclass(frozen=True)
class ResyncChunk(Message):
    """RESYNC_CHUNK: the current content of chunk `chunk` (the device's last chunk may be short)."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.RESYNC_CHUNK
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")
    chunk: int
    data: Buffer

    def encode(self) -> tuple[Buffer, ...]:
        return (self.LAYOUT.pack(self.chunk), self.data)

    @classmethod
    def decode(
        cls, payload: memoryview, frame_type: FrameType = FrameType.RESYNC_CHUNK
    ) -> ResyncChunk:
        _need(payload, cls.LAYOUT.size, "RESYNC_CHUNK", exact=False)
        data = payload[cls.LAYOUT.size :]
        if data.nbytes == 0 or data.nbytes % SECTOR_SIZE:
            raise ProtocolError(f"RESYNC_CHUNK has {data.nbytes} data bytes, not a multiple of 512")
        return cls(cls.LAYOUT.unpack_from(payload)[0], data)


@dataclass(frozen=True)
class ResyncDone(Message):
    """RESYNC_DONE: the resync pass is over; `chunks` RESYNC_CHUNK frames were sent in it."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.RESYNC_DONE
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")
    chunks: int

    def encode(self) -> tuple[Buffer, ...]:
        return (self.LAYOUT.pack(self.chunks),)

    @classmethod
    def decode(
        cls, payload: memoryview, frame_type: FrameType = FrameType.RESYNC_DONE
    ) -> ResyncDone:
        _need(payload, cls.LAYOUT.size, "RESYNC_DONE")
        return cls(cls.LAYOUT.unpack(payload)[0])


@dataclass(frozen=True)
class Ping(Message):
    """PING: the peer answers PONG with the same token and time (RTT and liveness)."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.PING
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQ")
    token: int
    time_ns: int = 0

    def encode(self) -> tuple[Buffer, ...]:
        return (self.LAYOUT.pack(self.token, self.time_ns),)

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType = FrameType.PING) -> Message:
        _need(payload, cls.LAYOUT.size, frame_type.name)
        return cls(*cls.LAYOUT.unpack(payload))


@dataclass(frozen=True)
class Pong(Ping):
    """PONG: the answer to a PING, echoing its token and time."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.PONG


@dataclass(frozen=True)
class CsumRequest(Message):
    """CSUM_REQUEST: send the digests of chunks [first, first + count)."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.CSUM_REQUEST
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QIHH")  # first, count, algorithm, reserved
    first: int
    count: int
    algorithm: DigestAlgorithm = DigestAlgorithm.BLAKE2B_256

    def encode(self) -> tuple[Buffer, ...]:
        return (self.LAYOUT.pack(self.first, self.count, self.algorithm, 0),)

    @classmethod
    def decode(
        cls, payload: memoryview, frame_type: FrameType = FrameType.CSUM_REQUEST
    ) -> CsumRequest:
        _need(payload, cls.LAYOUT.size, "CSUM_REQUEST")
        first, count, algorithm, reserved = cls.LAYOUT.unpack(payload)
        if not 0 < count <= MAX_CSUM_CHUNKS or reserved:
            raise ProtocolError(f"CSUM_REQUEST for {count} chunks (1 to {MAX_CSUM_CHUNKS} allowed)")
        try:
            return cls(first, count, DigestAlgorithm(algorithm))
        except ValueError:
            raise ProtocolError(
                f"CSUM_REQUEST names unknown digest algorithm {algorithm}"
            ) from None


@dataclass(frozen=True)
class CsumReply(Message):
    """CSUM_REPLY: the digests of chunks [first, first + len(digests)), in order."""

    FRAME_TYPE: ClassVar[FrameType] = FrameType.CSUM_REPLY
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QIHH")  # first, count, algorithm, digest size
    first: int
    digests: tuple[bytes, ...]
    algorithm: DigestAlgorithm = DigestAlgorithm.BLAKE2B_256

    def encode(self) -> tuple[Buffer, ...]:
        size = self.algorithm.size
        if any(len(d) != size for d in self.digests):
            raise ValueError(f"every {self.algorithm.name} digest must have {size} bytes")
        head = self.LAYOUT.pack(self.first, len(self.digests), self.algorithm, size)
        return (head, b"".join(self.digests))

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType = FrameType.CSUM_REPLY) -> CsumReply:
        _need(payload, cls.LAYOUT.size, "CSUM_REPLY", exact=False)
        first, count, algorithm, size = cls.LAYOUT.unpack_from(payload)
        try:
            algo = DigestAlgorithm(algorithm)
        except ValueError:
            raise ProtocolError(f"CSUM_REPLY names unknown digest algorithm {algorithm}") from None
        body = payload[cls.LAYOUT.size :]
        if size != algo.size or body.nbytes != count * size or count > MAX_CSUM_CHUNKS:
            raise ProtocolError(
                f"CSUM_REPLY says {count} digests of {size} bytes but carries {body.nbytes} bytes"
            )
        return cls(
            first, tuple(bytes(body[i : i + size]) for i in range(0, body.nbytes, size)), algo
        )


@dataclass(frozen=True)
class OutOfSync(Message):
    """OUT_OF_SYNC: a piece of the target's bitmap of chunks where its data and the source's may
    differ (its own writes as a former primary that the source may lack). The target sends the
    whole bitmap right after the handshake, in pieces of at most MAX_OOS_PIECE bytes in order,
    the last one flagged; all zero when it knows of no difference.

    Layout: u64 byte offset of the piece in the bitmap, u32 its length uncompressed, u8 last,
    3 bytes zero, then the piece compressed with zlib.
    """

    FRAME_TYPE: ClassVar[FrameType] = FrameType.OUT_OF_SYNC
    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QIB3x")
    offset: int
    bits: bytes
    last: bool

    def encode(self) -> tuple[Buffer, ...]:
        if len(self.bits) > MAX_OOS_PIECE:
            raise ValueError(f"an OUT_OF_SYNC piece holds at most {MAX_OOS_PIECE} bytes")
        head = self.LAYOUT.pack(self.offset, len(self.bits), int(self.last))
        return (head, zlib.compress(self.bits, 1))

    @classmethod
    def decode(cls, payload: memoryview, frame_type: FrameType = FrameType.OUT_OF_SYNC) -> OutOfSync:
        _need(payload, cls.LAYOUT.size, "OUT_OF_SYNC", exact=False)
        offset, length, last = cls.LAYOUT.unpack_from(payload)
        if length > MAX_OOS_PIECE or last > 1 or bytes(payload[13 : cls.LAYOUT.size]) != bytes(3):
            raise ProtocolError(f"OUT_OF_SYNC piece of {length} bytes, last={last}: malformed")
        inflate = zlib.decompressobj()
        try:
            bits = inflate.decompress(payload[cls.LAYOUT.size :], length + 1)
        except zlib.error as exc:
            raise ProtocolError(f"OUT_OF_SYNC piece does not decompress: {exc}") from None
        if len(bits) != length or not inflate.eof or inflate.unused_data:
            raise ProtocolError(f"OUT_OF_SYNC piece says {length} bytes but holds another amount")
        return cls(offset, bits, bool(last))


def out_of_sync_pieces(bitmap: bytes) -> list[OutOfSync]:
    """The OUT_OF_SYNC frames that carry `bitmap`, in order (one, empty, for an empty bitmap)."""
    pieces = [OutOfSync(off, bitmap[off : off + MAX_OOS_PIECE], False)
              for off in range(0, len(bitmap), MAX_OOS_PIECE)] or [OutOfSync(0, b"", False)]
    pieces[-1] = OutOfSync(pieces[-1].offset, pieces[-1].bits, True)
    return pieces


def receive_out_of_sync(conn: FramedConnection, nbytes: int) -> bytes:
    """Read the OUT_OF_SYNC frames of a bitmap of `nbytes` bytes (see `OutOfSync`): its bytes.
    ProtocolError if another frame comes first, or the pieces do not tile the bitmap exactly."""
    out = bytearray()
    while True:
        msg = conn.recv_message()
        if not isinstance(msg, OutOfSync):
            raise ProtocolError(f"expected OUT_OF_SYNC after the handshake, got {type(msg).__name__}")
        if msg.offset != len(out) or len(out) + len(msg.bits) > nbytes:
            raise ProtocolError(f"OUT_OF_SYNC piece at byte {msg.offset} of {len(msg.bits)} bytes "
                                f"does not follow the {len(out)} bytes before it in a bitmap "
                                f"of {nbytes} bytes")
        out += msg.bits
        if msg.last:
            if len(out) not in (0, nbytes):
                raise ProtocolError(f"OUT_OF_SYNC bitmap of {len(out)} bytes, expected {nbytes}")
            return bytes(out) if out else bytes(nbytes)


MAX_OOS_PIECE = 4 << 20  # bytes of bitmap per OUT_OF_SYNC frame, uncompressed (128 GiB at 4 KiB)
MAX_CSUM_CHUNKS = (MAX_PAYLOAD - CsumReply.LAYOUT.size) // 32
# The most data one CSUM_REQUEST may cover (count x chunk size): the target refuses more, so a
# request never makes it read gigabytes at once.
MAX_CSUM_BYTES = 64 << 20

_DECODERS: dict[FrameType, Callable[[memoryview, FrameType], Message]] = {
    FrameType.HELLO: Hello.decode,
    FrameType.CHALLENGE_RESPONSE: ChallengeResponse.decode,
    FrameType.WELCOME: Welcome.decode,
    FrameType.REFUSE: Refuse.decode,
    FrameType.WRITE: Record.decode,
    FrameType.FLUSH: Record.decode,
    FrameType.DISCARD: Record.decode,
    FrameType.WRITE_ZEROES: Record.decode,
    FrameType.RECORDS: Records.decode,
    FrameType.ACK: Ack.decode,
    FrameType.RESYNC_CHUNK: ResyncChunk.decode,
    FrameType.RESYNC_DONE: ResyncDone.decode,
    FrameType.CSUM_REQUEST: CsumRequest.decode,
    FrameType.CSUM_REPLY: CsumReply.decode,
    FrameType.OUT_OF_SYNC: OutOfSync.decode,
    FrameType.PAUSE: Pause.decode,
    FrameType.RESUME: Resume.decode,
    FrameType.PING: Ping.decode,
    FrameType.PONG: Pong.decode,
    FrameType.ERROR: Error.decode,
}
assert set(_DECODERS) == set(FrameType), "every frame type needs a decoder"


def decode(frame_type: FrameType, payload: memoryview) -> Message:
    """The payload dataclass of a frame. Raises ProtocolError if the payload is malformed.

    Buffers in the result (a WRITE's or RESYNC_CHUNK's data) are views into `payload`.
    """
    return _DECODERS[frame_type](payload, frame_type)


def encode(message: Message) -> tuple[FrameType, tuple[Buffer, ...]]:
    """The frame type and payload buffers of a payload dataclass (buffers are not copied)."""
    return message.frame_type, message.encode()


# --------------------------------------------------------------------------------------------
# Handshake
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeInfo:
    """What this side tells the peer in its HELLO."""

    resource: str
    node: str
    role: Role  # the SOURCE connects and speaks first; the TARGET listens
    device_size: int  # bytes
    chunk_size: int  # bytes
    generations: Generations
    # The source: the codec it offers for its data frames (it is sent NONE if this side cannot
    # use it). A target ignores it: it accepts any codec it can use (repctl.compress.available)
    compression: Codec = Codec.NONE
    compression_level: int = 0  # the source's zstd level (0: the default); never sent


@dataclass(frozen=True)
class PeerInfo:
    """The peer, as authenticated by the handshake; `compression` is the session's codec, the
    same on both sides (NONE unless the source offered one and the target accepted it)."""

    protocol_version: int
    resource: str
    node: str
    role: Role
    device_size: int
    chunk_size: int
    generations: Generations
    compression: Codec = Codec.NONE


@dataclass(frozen=True)
class Expect:
    """What this side accepts of a peer.

    `peers`: the node names accepted as the peer; the source names exactly the one target it
    connects to. `check`: an optional policy hook run on the authenticated peer after the built-in
    checks; it refuses by raising HandshakeRefused (e.g. SPLIT_BRAIN after `compare_generations`).
    """

    peers: frozenset[str]
    check: Callable[[PeerInfo], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.peers, str):
            raise TypeError("peers must be a collection of node names, not one string")
        object.__setattr__(self, "peers", frozenset(self.peers))


def handshake(
    conn: FramedConnection,
    local: HandshakeInfo,
    secret: bytes,
    expect: Expect,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> PeerInfo:
    """Run the handshake on a fresh connection, on either side, and return the authenticated peer.

    The side is `local.role`: the SOURCE sends its HELLO first, the TARGET answers. On a refusal by
    either side, HandshakeRefused (AuthError for a failed authentication) is raised, with `remote`
    saying who refused; a malformed exchange raises ProtocolError, and so does a handshake not
    finished within `timeout` seconds in all (a deadline, not a per-frame timeout). Until the peer
    is authenticated no frame may carry more than MAX_HANDSHAKE_PAYLOAD bytes. On success the
    connection authenticates every later frame in both directions under keys derived from this
    handshake, and uses the negotiated codec (`PeerInfo.compression`) for its data frames. In
    every failure case the caller must close the connection; nothing of the peer may be used.
    """
    if not secret:
        raise ValueError("an empty shared secret")
    if local.role is Role.SOURCE and len(expect.peers) != 1:
        raise ValueError("the source must expect exactly the one target it connects to")
    old_timeout = conn.sock.gettimeout()
    old_max = conn.max_payload
    conn.sock.settimeout(timeout)
    conn.deadline = time.monotonic() + timeout
    conn.max_payload = min(old_max, MAX_HANDSHAKE_PAYLOAD)
    conn.plain_refuse_ok = True
    try:
        return _Handshake(conn, local, secret, expect).run()
    except TimeoutError:
        raise ProtocolError(
            f"handshake timed out: the peer did not finish it within {timeout:g} s"
        ) from None
    except OSError as exc:  # e.g. reset by a peer that closed with our frames unread
        raise ProtocolError(f"connection lost during the handshake: {exc}") from None
    finally:
        conn.deadline = None
        conn.max_payload = old_max
        conn.plain_refuse_ok = False
        with contextlib.suppress(OSError):
            conn.sock.settimeout(old_timeout)


class _Handshake:
    def __init__(
        self, conn: FramedConnection, local: HandshakeInfo, secret: bytes, expect: Expect
    ) -> None:
        self.conn = conn
        self.local = local
        self.secret = secret
        self.expect = expect
        self.nonce = secrets.token_bytes(NONCE_SIZE)

    def run(self) -> PeerInfo:
        local = self.local
        if local.role is Role.SOURCE:
            (expected_peer,) = self.expect.peers
            mine, mine_payload = self.hello(expected_peer)
            self.send(mine_payload)
            theirs, theirs_digest = self.receive_hello()
        else:
            theirs, theirs_digest = self.receive_hello()
            mine, mine_payload = self.hello(theirs.node, theirs.compression)
            self.send(mine_payload)
        mine_digest = hashlib.sha256(mine_payload).digest()

        # Prove that we hold the secret, then check the peer's proof.
        own_proof = _auth_mac(self.secret, mine, mine_digest, theirs, theirs_digest)
        self.send_message(ChallengeResponse(own_proof))
        proof = ChallengeResponse.decode(self.receive(FrameType.CHALLENGE_RESPONSE))
        expected = _auth_mac(self.secret, theirs, theirs_digest, mine, mine_digest)
        if not hmac.compare_digest(proof.mac, expected):
            self.refuse(
                AuthError,
                RefuseReason.AUTH_FAILED,
                f"authentication of node {theirs.node!r} for resource {local.resource!r} failed: "
                "the shared secrets differ, or the peer is not who it claims to be",
            )

        # From here on the peer's HELLO is authenticated, and so is the codec each side named:
        # the source's offer, the target's answer (the offer or NONE) is the session's.
        session = Codec(mine.compression) if local.role is Role.TARGET else Codec.NONE
        if local.role is Role.SOURCE and theirs.compression in (Codec.NONE, mine.compression):
            session = Codec(theirs.compression)
        peer = PeerInfo(
            theirs.protocol_version,
            theirs.resource,
            theirs.node,
            theirs.role,
            theirs.device_size,
            theirs.chunk_size,
            theirs.generations,
            session,
        )
        refusal: tuple[int, str] | None = _check_peer(local, self.expect, peer, theirs.peer)
        if refusal is None and local.role is Role.SOURCE and session != theirs.compression:
            offer, answer = _codec_word(mine.compression), _codec_word(theirs.compression)
            refusal = (RefuseReason.PROTOCOL,
                       f"node {theirs.node!r} answered the compression offer {offer} with {answer}")
        if refusal is None and self.expect.check is not None:
            try:
                self.expect.check(peer)
            except HandshakeRefused as exc:
                refusal = (exc.reason, exc.text)
        if refusal is not None:
            self.refuse(HandshakeRefused, *refusal)

        # Every frame from our WELCOME on is authenticated, in both directions.
        if local.role is Role.SOURCE:
            keys = _session_keys(self.secret, mine, mine_digest, theirs, theirs_digest)
            self.conn.authenticate(keys[0], keys[1])
        else:
            keys = _session_keys(self.secret, theirs, theirs_digest, mine, mine_digest)
            self.conn.authenticate(keys[1], keys[0])
        self.conn.set_compression(session, local.compression_level)
        self.send_message(Welcome())
        self.receive(FrameType.WELCOME)
        return peer

    def hello(self, peer: str, offer: int = Codec.NONE) -> tuple[Hello, bytes]:
        """Our HELLO to `peer`, and its payload. Its codec: the source's offer, the one it is
        configured with if this side can use it; the target's answer to the source's `offer`,
        the offer if this side can use it, else NONE (an unknown codec too)."""
        local = self.local
        codec = local.compression if local.role is Role.SOURCE else offer
        hello = Hello(
            PROTOCOL_VERSION,
            local.role,
            local.resource,
            local.node,
            peer,
            local.device_size,
            local.chunk_size,
            local.generations,
            self.nonce,
            codec if available(codec) else Codec.NONE,
        )
        (payload,) = hello.encode()
        return hello, bytes(payload)

    def receive_hello(self) -> tuple[Hello, bytes]:
        """The peer's HELLO and the SHA-256 of its payload; only checks needed before the HMAC."""
        payload = self.receive(FrameType.HELLO)
        version = Hello.peek_version(payload)
        if version != PROTOCOL_VERSION:
            self.refuse(
                HandshakeRefused,
                RefuseReason.VERSION,
                f"protocol version {version} is not supported "
                f"(this side speaks {PROTOCOL_VERSION}): run one repctl release on every node "
                "of the resource",
            )
        try:
            hello = Hello.decode(payload)
        except ProtocolError as exc:
            self.refuse(ProtocolError, RefuseReason.PROTOCOL, str(exc))
        if hello.resource != self.local.resource:
            self.refuse(
                HandshakeRefused,
                RefuseReason.UNKNOWN_RESOURCE,
                f"unknown resource {hello.resource!r}: node {self.local.node} serves "
                f"{self.local.resource!r} on this connection",
            )
        if hello.nonce == self.nonce:
            self.refuse(AuthError, RefuseReason.AUTH_FAILED, "the peer sent back our own nonce")
        return hello, hashlib.sha256(payload).digest()

    def send(self, payload: bytes) -> None:
        self._send(lambda: self.conn.send(FrameType.HELLO, payload))

    def send_message(self, message: Message) -> None:
        self._send(lambda: self.conn.send_message(message))

    def _send(self, action: Callable[[], object]) -> None:
        try:
            action()
        except OSError as exc:
            # The peer may have refused and closed: its REFUSE can still be waiting for us.
            try:
                frame = self.conn.recv()
            except (OSError, ProtocolError):
                raise ProtocolError(f"connection lost during the handshake: {exc}") from exc
            self._raise_refusal(frame)
            raise ProtocolError(f"connection lost during the handshake: {exc}") from exc

    def receive(self, want: FrameType) -> memoryview:
        try:
            frame = self.conn.recv()
        except ConnectionClosed:
            raise ConnectionClosed(
                f"the peer closed the connection during the handshake (waiting for {want.name})"
            ) from None
        self._raise_refusal(frame)
        if frame.type is not want:
            self.refuse(
                ProtocolError,
                RefuseReason.PROTOCOL,
                f"expected a {want.name} frame in the handshake, got {frame.type.name}",
            )
        return frame.payload

    @staticmethod
    def _raise_refusal(frame: Frame) -> None:
        if frame.type is FrameType.REFUSE:
            refusal = Refuse.decode(frame.payload, FrameType.REFUSE)
            assert isinstance(refusal, Refuse)
            cls = AuthError if refusal.reason == RefuseReason.AUTH_FAILED else HandshakeRefused
            raise cls(refusal.reason, refusal.text, remote=True)
        if frame.type is FrameType.ERROR:
            error = Error.decode(frame.payload, FrameType.ERROR)
            assert isinstance(error, Error)
            raise ProtocolError(f"the peer reported an error in the handshake: {error.text}")

    def refuse(self, error: type[Exception], reason: int, text: str) -> NoReturn:
        """Send REFUSE (best effort), let the peer read it, and raise `error`."""
        with contextlib.suppress(OSError, ProtocolError):
            self.conn.send_message(Refuse(reason, text))
        self.conn.linger()
        if issubclass(error, HandshakeRefused):
            raise error(reason, text)
        raise error(text)


def _codec_word(codec: int) -> str:
    try:
        return Codec(codec).word
    except ValueError:
        return f"codec {codec}"


def _auth_mac(
    secret: bytes, sender: Hello, sender_digest: bytes, receiver: Hello, receiver_digest: bytes
) -> bytes:
    """HMAC-SHA256 proof of the secret by the sender of HELLO `sender` (docs/protocol.md).

    The digests are the SHA-256 of the two HELLO payloads as sent, which binds every HELLO field.
    """
    msg = bytearray(AUTH_LABEL)
    msg.append(sender.role)
    msg += sender.nonce + receiver.nonce
    for name in (sender.resource, sender.node, receiver.node):
        data = name.encode("utf-8")
        msg += bytes([len(data)]) + data
    msg += sender_digest + receiver_digest
    return hmac.new(secret, bytes(msg), hashlib.sha256).digest()


def _session_keys(
    secret: bytes, source: Hello, source_digest: bytes, target: Hello, target_digest: bytes
) -> tuple[bytes, bytes]:
    """The session's frame keys, (source -> target, target -> source) (docs/protocol.md).

    Both nonces make them fresh for every connection, so frames of one session are worthless in
    another.
    """
    session = hmac.new(
        secret,
        SESSION_LABEL + source.nonce + target.nonce + source_digest + target_digest,
        hashlib.sha256,
    ).digest()
    return (
        hmac.new(session, b"source->target", hashlib.sha256).digest(),
        hmac.new(session, b"target->source", hashlib.sha256).digest(),
    )


def _check_peer(
    local: HandshakeInfo, expect: Expect, peer: PeerInfo, peer_expects: str
) -> tuple[RefuseReason, str] | None:
    """The built-in checks of an authenticated peer: None, or why to refuse it."""
    if peer.node not in expect.peers:
        accepted = ", ".join(sorted(expect.peers)) or "none"
        return (
            RefuseReason.UNEXPECTED_NODE,
            (
                f"node {peer.node!r} is not an expected peer of {local.node!r} for resource "
                f"{local.resource!r} (expected: {accepted})"
            ),
        )
    if peer_expects != local.node:
        return (
            RefuseReason.UNEXPECTED_NODE,
            f"node {peer.node!r} wanted to reach node {peer_expects!r} but reached {local.node!r}",
        )
    if peer.role == local.role:
        return (
            RefuseReason.ROLE_CONFLICT,
            (
                f"both {local.node!r} and {peer.node!r} claim the {local.role.name} role "
                f"of resource {local.resource!r}"
            ),
        )
    if peer.chunk_size != local.chunk_size:
        return (
            RefuseReason.CHUNK_SIZE_MISMATCH,
            (
                f"chunk sizes differ: {local.node!r} has {format_bytes(local.chunk_size)}, "
                f"{peer.node!r} has {format_bytes(peer.chunk_size)}"
            ),
        )
    source, target = (local, peer) if local.role is Role.SOURCE else (peer, local)
    if target.device_size < source.device_size:
        t, s = format_bytes(target.device_size), format_bytes(source.device_size)
        exact = f" ({target.device_size} < {source.device_size} bytes)" if t == s else ""
        return (
            RefuseReason.DEVICE_TOO_SMALL,
            f"target device {t} is smaller than the source's {s}{exact}",
        )
    return None


def format_bytes(n: int) -> str:
    """`n` bytes for humans, one decimal: ``512 B``, ``4.0 KiB``, ``1.0 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# Data generations
# --------------------------------------------------------------------------------------------


class GenerationRelation(IntEnum):
    """How the data of two nodes relate, from their generation identifiers."""

    EQUAL = 0  # same current generation: only the bitmap (if any) differs
    LOCAL_AHEAD = 1  # the peer holds an older generation of our data (or none): we resync it
    PEER_AHEAD = 2  # we hold an older generation of the peer's data (or none): it resyncs us
    DIVERGED = 3  # both changed the data since a common generation: split brain
    UNRELATED = 4  # no generation in common: different data, only a full sync by hand may join them


def compare_generations(local: Generations, peer: Generations) -> GenerationRelation:
    """Compare two nodes' generations (P6). A current of 0 means "no data yet": behind anything."""
    if local.current == peer.current:
        return GenerationRelation.EQUAL
    if peer.current == 0 or peer.current in local.history:
        return GenerationRelation.LOCAL_AHEAD
    if local.current == 0 or local.current in peer.history:
        return GenerationRelation.PEER_AHEAD
    if set(local.history) & set(peer.history):
        return GenerationRelation.DIVERGED
    return GenerationRelation.UNRELATED
