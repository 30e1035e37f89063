"""Fuzzing the wire protocol with hypothesis: the payload decoder, the framing and the handshake.

Issue 10: everything a peer sends is hostile until its HMAC is verified, and the handshake is the
part of the daemon that anyone who can reach the port talks to. The property of every test here:
no input makes `decode`, `FramedConnection.recv` or `handshake` raise anything but the protocol's
documented errors (repctl.errors: ProtocolError and its ConnectionClosed, HandshakeRefused and its
AuthError) - never a struct.error, IndexError, UnicodeError, ValueError, KeyError, AssertionError,
MemoryError or a bare OSError/TimeoutError - and nothing that is rejected is ever taken as valid:

- `decode` accepts exactly the canonical encoding of a message (decode then encode gives the same
  bytes back), so a mutated payload is either refused or another well-formed message;
- `recv` is checked frame by frame against a model of the framing written from docs/protocol.md
  (a differential test): it returns exactly the frames the model accepts, and ConnectionClosed
  only when the stream ends between two frames;
- with frame authentication on, a changed stream yields nothing but a prefix of what was sent;
- `handshake` never returns a PeerInfo unless the other side computed the proof of the secret
  (and the tagged WELCOME) itself, from the formulas in docs/protocol.md.

Bounded and repeatable: every test has a fixed max_examples, derandomize=True and no example
database, so CI runs the same examples every time: about 3,200 in all, 10 to 25 s on two
cores.
Socketpairs and threads only, no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from repctl import protocol as p
from repctl.errors import AuthError, ConnectionClosed, HandshakeRefused, ProtocolError

SECRET = b"correct horse battery staple"
OTHER_SECRET = b"another secret, of some length"
GiB = 1 << 30
# The framing tests keep the connection's maximum payload small, so that a forged length field
# never makes hypothesis allocate 16 MiB per example.
MAX_PAYLOAD = 4096
# Seconds a fuzzed handshake may last: a peer that stops sending ends it this quickly.
TIMEOUT = 0.5


def fuzz(examples: int) -> settings:
    """Bounded, repeatable hypothesis settings: the same `examples` examples on every run."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# ---------------------------------------------------------------------------------------------
# Strategies: a valid message of every frame type
# ---------------------------------------------------------------------------------------------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
WIRE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
wire_names = st.text(WIRE_CHARS, min_size=1, max_size=255)
nonces = st.binary(min_size=p.NONCE_SIZE, max_size=p.NONCE_SIZE)
generations = st.builds(
    p.Generations, u64, st.lists(st.integers(1, 2**64 - 1), max_size=p.MAX_HISTORY).map(tuple)
)
# Texts that survive the decoder unchanged: printable, at most 256 characters (1024 UTF-8 bytes).
printable_texts = st.text(
    st.characters(categories=("L", "M", "N", "P", "S"), include_characters=" "), max_size=256
).filter(str.isprintable)
record_flags = st.sampled_from([p.NO_FLAGS, p.RecordFlags.FUA])
sectors_of_data = st.integers(1, 3).flatmap(lambda n: st.binary(min_size=512 * n, max_size=512 * n))
record_lengths = st.integers(1, (2**32 - 1) // p.SECTOR_SIZE).map(lambda n: n * p.SECTOR_SIZE)
digest_algorithms = st.sampled_from(p.DigestAlgorithm)


def hellos(
    *,
    version: st.SearchStrategy[int] = u16,
    role: st.SearchStrategy[p.Role] = st.sampled_from(p.Role),
    names: st.SearchStrategy[str] = wire_names,
    sizes: st.SearchStrategy[int] = u64,
    chunks: st.SearchStrategy[int] = u32,
) -> st.SearchStrategy[p.Hello]:
    return st.builds(
        p.Hello, version, role, names, names, names, sizes, chunks, generations, nonces
    )


# One strategy per frame type; the test below makes sure that a type added to the protocol gets one.
MESSAGES: dict[p.FrameType, st.SearchStrategy[p.Message]] = {
    p.FrameType.HELLO: hellos(),
    p.FrameType.CHALLENGE_RESPONSE: st.builds(
        p.ChallengeResponse, st.binary(min_size=p.MAC_SIZE, max_size=p.MAC_SIZE)
    ),
    p.FrameType.WELCOME: st.just(p.Welcome()),
    p.FrameType.REFUSE: st.builds(
        p.Refuse, st.one_of(st.sampled_from(p.RefuseReason), u16), printable_texts
    ),
    p.FrameType.WRITE: st.builds(p.write_record, u64, u64, sectors_of_data, record_flags),
    p.FrameType.FLUSH: st.builds(p.Record, st.just(p.RecordOp.FLUSH), u64, flags=record_flags),
    p.FrameType.DISCARD: st.builds(
        p.Record, st.just(p.RecordOp.DISCARD), u64, u64, record_lengths, record_flags
    ),
    p.FrameType.WRITE_ZEROES: st.builds(
        p.Record, st.just(p.RecordOp.WRITE_ZEROES), u64, u64, record_lengths, record_flags
    ),
    p.FrameType.RECORDS: st.tuples(
        st.integers(0, 2**64 - 9),
        st.lists(st.one_of(
            st.builds(lambda seq, sec, d, f: p.write_record(seq, sec, d, f),
                      st.just(0), u64, sectors_of_data, record_flags),
            st.builds(p.Record, st.just(p.RecordOp.FLUSH), st.just(0), flags=record_flags),
            st.builds(p.Record, st.sampled_from([p.RecordOp.DISCARD, p.RecordOp.WRITE_ZEROES]),
                      st.just(0), u64, record_lengths, record_flags),
        ), min_size=1, max_size=4),
    ).map(lambda t: p.Records(tuple(dataclasses.replace(r, ring_seq=t[0] + i)
                                    for i, r in enumerate(t[1])))),
    p.FrameType.ACK: st.builds(p.Ack, u64, st.booleans()),
    p.FrameType.RESYNC_CHUNK: st.builds(p.ResyncChunk, u64, sectors_of_data),
    p.FrameType.RESYNC_DONE: st.builds(p.ResyncDone, u64),
    p.FrameType.CSUM_REQUEST: st.builds(
        p.CsumRequest, u64, st.integers(1, p.MAX_CSUM_CHUNKS), digest_algorithms
    ),
    p.FrameType.CSUM_REPLY: st.builds(
        p.CsumReply,
        u64,
        st.lists(st.binary(min_size=32, max_size=32), max_size=6).map(tuple),
        digest_algorithms,
    ),
    p.FrameType.OUT_OF_SYNC: st.builds(
        p.OutOfSync, st.integers(0, 1 << 40), st.binary(max_size=64), st.booleans()
    ),
    p.FrameType.PAUSE: st.just(p.Pause()),
    p.FrameType.RESUME: st.just(p.Resume()),
    p.FrameType.PING: st.builds(p.Ping, u64, u64),
    p.FrameType.PONG: st.builds(p.Pong, u64, u64),
    p.FrameType.ERROR: st.builds(
        p.Error, st.one_of(st.sampled_from(p.ErrorCode), u16), printable_texts
    ),
}
messages = st.one_of(*MESSAGES.values())
frame_types = st.sampled_from(p.FrameType)


def payload_of(message: p.Message) -> bytes:
    frame_type, parts = p.encode(message)
    assert frame_type == message.frame_type
    return b"".join(bytes(part) for part in parts)


# ---------------------------------------------------------------------------------------------
# Mutations of a byte string: bit flips, overwrites, truncation, extension, insertion, deletion
# ---------------------------------------------------------------------------------------------

# Values that hit the edges of length, count and enum fields
BOUNDARY = [0, 1, 2, 3, 4, 5, 31, 32, 33, 255, 256, 511, 512, 513, 1024, 1026, 1027, 4096,
            0x7FFF, 0xFFFF, 0x10000, p.MAX_CSUM_CHUNKS, p.MAX_CSUM_CHUNKS + 1, 2**31, 2**32 - 1,
            2**63, 2**64 - 1]  # fmt: skip


@st.composite
def mutations(draw: st.DrawFn, data: bytes, *, min_ops: int = 1, max_ops: int = 4) -> bytes:
    """`data` changed by a few random edits."""
    out = bytearray(data)
    for _ in range(draw(st.integers(min_ops, max_ops))):
        kind = draw(
            st.sampled_from(["flip", "byte", "field", "truncate", "extend", "insert", "delete"])
        )
        if kind in ("flip", "byte", "field", "delete") and not out:
            kind = "extend"
        if kind == "flip":
            i = draw(st.integers(0, len(out) - 1))
            out[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        elif kind == "field":  # an integer field of 1, 2, 4 or 8 bytes set to an edge value
            width = draw(st.sampled_from([1, 2, 4, 8]))
            i = draw(st.integers(0, max(0, len(out) - width)))
            value = draw(st.one_of(st.sampled_from(BOUNDARY), u64)) % (1 << (8 * width))
            out[i : i + width] = value.to_bytes(width, "little")
        elif kind == "truncate":
            del out[draw(st.integers(0, len(out))) :]
        elif kind == "extend":
            out += draw(st.binary(min_size=1, max_size=64))
        elif kind == "insert":
            i = draw(st.integers(0, len(out)))
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            i = draw(st.integers(0, len(out) - 1))
            del out[i : i + draw(st.integers(1, 16))]
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# 1. The payload decoder
# ---------------------------------------------------------------------------------------------


def decode_or_refuse(frame_type: p.FrameType, payload: bytes) -> p.Message | None:
    """Decode `payload` as `frame_type`: the message, or None if the decoder refused it.

    Anything but a ProtocolError escapes and fails the test with its own traceback. An accepted
    payload must be the canonical encoding of the message returned.
    """
    try:
        message = p.decode(frame_type, memoryview(payload))
    except ConnectionClosed:
        raise AssertionError("the decoder raised ConnectionClosed, which only recv may raise")
    except ProtocolError:
        event("decode: refused")
        return None
    event("decode: accepted")
    assert message.frame_type == frame_type, (frame_type, message)
    if isinstance(message, (p.Refuse, p.Error)):
        # The texts come from the peer: invalid UTF-8 and non-printable characters are replaced.
        assert message.text.isprintable(), message
        assert len(message.text.encode()) <= 3 * p.MAX_TEXT  # U+FFFD is three bytes
        assert int(message.code) == int.from_bytes(payload[:2], "little")
        try:
            text = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            return message
        if not text.isprintable():
            return message
    if isinstance(message, p.OutOfSync):
        # zlib has many encodings of the same bytes: canonical is the bitmap, not the payload
        assert p.decode(frame_type, memoryview(payload_of(message))) == message
        return message
    assert payload_of(message) == payload, f"{frame_type.name} accepted a non-canonical payload"
    return message


def test_every_frame_type_has_a_fuzz_strategy():
    assert set(MESSAGES) == set(p.FrameType)


@fuzz(300)
@given(messages)
def test_valid_messages_round_trip(message):
    payload = payload_of(message)
    assert p.decode(message.frame_type, memoryview(payload)) == message
    assert decode_or_refuse(message.frame_type, payload) == message


@fuzz(200)
@given(frame_types, st.binary(max_size=p.MAX_HANDSHAKE_PAYLOAD + 64))
@example(p.FrameType.HELLO, b"")
@example(p.FrameType.HELLO, b"\x01\x00")
@example(p.FrameType.HELLO, bytes(88))
@example(p.FrameType.HELLO, b"\x01\x00\x01" + bytes(85) + b"\x02r0")
@example(p.FrameType.REFUSE, b"\x05")
@example(p.FrameType.REFUSE, b"\x05\x00\xff\xfe\x1b[2J")
@example(p.FrameType.WRITE, bytes(24))
@example(p.FrameType.CSUM_REPLY, bytes(16))
def test_arbitrary_payloads_are_refused_or_canonical(frame_type, payload):
    decode_or_refuse(frame_type, payload)


@st.composite
def sized_payloads(draw: st.DrawFn) -> tuple[p.FrameType, bytes]:
    """Random bytes of exactly the size of a valid payload, so the decoder gets past its length
    checks and meets every field."""
    frame_type = draw(frame_types)
    size = len(payload_of(draw(MESSAGES[frame_type])))
    return frame_type, draw(st.binary(min_size=size, max_size=size))


@fuzz(200)
@given(sized_payloads())
def test_random_payloads_of_a_valid_size_are_refused_or_canonical(case):
    decode_or_refuse(*case)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> tuple[p.FrameType, p.Message, bytes]:
    message = draw(messages)
    # decoded as its own type mostly, sometimes as another one
    frame_type = draw(st.sampled_from([message.frame_type] * 3 + list(p.FrameType)))
    return frame_type, message, draw(mutations(payload_of(message)))


@fuzz(400)
@given(mutated_payloads())
def test_mutated_payloads_are_refused_or_canonical(case):
    frame_type, original, mutated = case
    message = decode_or_refuse(frame_type, mutated)
    if mutated == payload_of(original) and frame_type == original.frame_type:
        assert message == original


# ---------------------------------------------------------------------------------------------
# 2. Framing: FramedConnection.recv against a model of docs/protocol.md, "Framing"
# ---------------------------------------------------------------------------------------------

HEADER = struct.Struct("<IHHIIQII")  # magic, version, type, flags, length, seq, crc, reserved
MAGIC = int.from_bytes(b"RPL1", "little")
VERSIONLESS = {p.FrameType.HELLO, p.FrameType.REFUSE}
V = p.PROTOCOL_VERSION
HEADER_FIELDS = {  # name: (offset, struct format) in the 32-byte header
    "magic": (0, "<I"),
    "version": (4, "<H"),
    "type": (6, "<H"),
    "flags": (8, "<I"),
    "length": (12, "<I"),
    "seq": (16, "<Q"),
    "crc": (24, "<I"),
    "reserved": (28, "<I"),
}


def frame_bytes(frame_type: int, seq: int, payload: bytes, *, version: int = V) -> bytes:
    """A frame without MAC, built by hand from the layout in docs/protocol.md."""
    header = HEADER.pack(MAGIC, version, frame_type, 0, len(payload), seq, 0, 0)
    crc = zlib.crc32(payload, zlib.crc32(header))
    return HEADER.pack(MAGIC, version, frame_type, 0, len(payload), seq, crc, 0) + payload


def stream_of(msgs: list[p.Message], first_seq: int = 1) -> tuple[bytes, list[int]]:
    """The frames of `msgs` back to back, and the offset where each frame starts."""
    out, offsets = b"", []
    for seq, message in enumerate(msgs, first_seq):
        offsets.append(len(out))
        out += frame_bytes(message.frame_type, seq, payload_of(message))
    return out, offsets


class Closed(Exception):
    """The model's verdict: an orderly end of the stream between two frames."""


class Broken(Exception):
    """The model's verdict: a frame that must be refused."""


def model_frame(stream: bytes, offset: int, seq: int, max_payload: int) -> tuple[int, bytes, int]:
    """The frame at `offset` as docs/protocol.md defines a valid one (no MAC: before the
    handshake's keys), as (type, payload, next offset); raises Closed or Broken."""
    if offset == len(stream):
        raise Closed
    if len(stream) - offset < HEADER.size:
        raise Broken("truncated header")
    magic, version, ftype, flags, length, fseq, crc, reserved = HEADER.unpack_from(stream, offset)
    if magic != MAGIC:
        raise Broken("magic")
    if length > max_payload:
        raise Broken("length")
    if flags or reserved:
        raise Broken("flags or reserved")  # FLAG_MAC too: no key before the handshake
    start = offset + HEADER.size
    if len(stream) - start < length:
        raise Broken("truncated payload")
    payload = stream[start : start + length]
    zeroed = HEADER.pack(magic, version, ftype, flags, length, fseq, 0, reserved)
    if zlib.crc32(payload, zlib.crc32(zeroed)) != crc:
        raise Broken("crc")
    if ftype not in set(p.FrameType):
        raise Broken("type")
    if version != V and ftype not in VERSIONLESS:
        raise Broken("version")
    if fseq != seq:
        raise Broken("seq")
    return ftype, payload, start + length


def receive_all(
    stream: bytes, *, max_payload: int = MAX_PAYLOAD, pieces: list[int] | None = None
) -> tuple[list[tuple[int, bytes]], ProtocolError]:
    """Feed `stream` to a FramedConnection over a socketpair, then close the writer; return the
    (type, payload) of every frame received and the ProtocolError that ended the stream.

    With `pieces`, a thread writes the stream in pieces of those sizes, so that recv meets
    partial reads; else it is all in the socket's buffer before the first recv.
    """
    writer, reader = socket.socketpair()
    with writer, reader:
        reader.settimeout(10)  # a recv that waits for bytes after the EOF would hang the test

        def write() -> None:
            try:
                pos = 0
                for n in pieces or [len(stream)]:
                    writer.sendall(stream[pos : pos + n])
                    pos += n
                    if pieces:
                        time.sleep(0)
                writer.sendall(stream[pos:])
                writer.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the reader gave up and closed

        thread = threading.Thread(target=write, daemon=True) if pieces else None
        if thread:
            thread.start()
        else:
            write()
        conn = p.FramedConnection(reader, max_payload=max_payload)
        got: list[tuple[int, bytes]] = []
        try:
            for _ in range(len(stream) // HEADER.size + 2):
                try:
                    frame = conn.recv()
                except ProtocolError as exc:
                    # an unusable connection stays unusable
                    with pytest.raises(ProtocolError):
                        conn.recv()
                    return got, exc
                assert frame.payload.nbytes == frame.header.length
                got.append((int(frame.type), bytes(frame.payload)))
            raise AssertionError(f"recv returned {len(got)} frames from {len(stream)} bytes")
        finally:
            conn.close()
            if thread:
                thread.join(10)


def check_against_model(
    stream: bytes, *, max_payload: int = MAX_PAYLOAD, pieces: list[int] | None = None
) -> list[tuple[int, bytes]]:
    """recv returns exactly the frames that the model accepts, then the model's verdict."""
    got, error = receive_all(stream, max_payload=max_payload, pieces=pieces)
    offset = 0
    for i, (ftype, payload) in enumerate(got):
        try:
            want_type, want_payload, offset = model_frame(stream, offset, i + 1, max_payload)
        except (Closed, Broken) as verdict:
            raise AssertionError(f"recv took frame {i + 1} as valid, the model says {verdict!r}")
        assert (ftype, payload) == (want_type, want_payload), f"frame {i + 1} differs"
    event(f"recv: {min(len(got), 3)} frames")
    try:
        model_frame(stream, offset, len(got) + 1, max_payload)
    except Closed:
        event("recv: ended by ConnectionClosed")
        assert isinstance(error, ConnectionClosed), f"EOF between frames: {error!r}"
    except Broken as verdict:
        event(f"recv: refused ({verdict})")
        assert not isinstance(error, ConnectionClosed), f"{verdict}, yet {error!r}"
    else:
        raise AssertionError(f"recv refused a frame that the model accepts: {error!r}")
    return got


@fuzz(150)
@given(st.one_of(st.binary(max_size=2048), st.binary(min_size=28, max_size=2048),
                 st.binary(min_size=28, max_size=1024).map(b"RPL1".__add__)))
@example(b"")
@example(b"RPL1")
@example(b"GET / HTTP/1.1\r\n\r\n")
@example(frame_bytes(p.FrameType.PING, 1, bytes(16))[:-1])
def test_recv_of_arbitrary_bytes(stream):
    check_against_model(stream)


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    return stream_of(draw(st.lists(messages, min_size=1, max_size=5)))


@fuzz(100)
@given(frame_streams(), st.data())
def test_recv_of_valid_frames_then_garbage(valid, data):
    stream, offsets = valid
    got = check_against_model(stream + data.draw(st.binary(max_size=256)))
    assert len(got) >= len(offsets)  # the valid frames all arrive


@fuzz(150)
@given(frame_streams(), st.data())
def test_recv_of_truncated_streams(valid, data):
    stream, offsets = valid
    cut = data.draw(st.integers(0, len(stream)))
    got = check_against_model(stream[:cut])
    assert len(got) == sum(1 for o, end in zip(offsets, offsets[1:] + [len(stream)]) if end <= cut)


@fuzz(200)
@given(frame_streams(), st.data())
def test_recv_of_frames_with_a_forged_header_field(valid, data):
    """One header field of one frame set to another value, the crc recomputed or not."""
    stream, offsets = valid
    k = data.draw(st.integers(0, len(offsets) - 1), label="frame")
    name = data.draw(st.sampled_from(sorted(HEADER_FIELDS)), label="field")
    offset, fmt = HEADER_FIELDS[name]
    size = struct.calcsize(fmt)
    start = offsets[k]
    old = struct.unpack_from(fmt, stream, start + offset)[0]
    special = {
        "magic": [int.from_bytes(b"RPL2", "little"), int.from_bytes(b"HTTP", "little")],
        "version": [0, V + 1, 0xFFFF],
        "type": [int(t) for t in p.FrameType] + [0, 5, 15, 64, 0xFFFF],
        "flags": [p.FLAG_MAC, 2, 0x80000000],
        "length": [old - 1, old + 1, 0, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2**32 - 1],
        "seq": [old - 1, old + 1, 0, 2**64 - 1],
        "crc": [old ^ 1, 0],
        "reserved": [1, 2**32 - 1],
    }[name]
    value = data.draw(
        st.one_of(st.sampled_from(special), st.integers(0, 2 ** (8 * size) - 1)), label="value"
    ) % (2 ** (8 * size))
    recompute = name != "crc" and data.draw(st.booleans(), label="recompute crc")
    forged = bytearray(stream)
    struct.pack_into(fmt, forged, start + offset, value)
    if recompute:  # a forger who knows the crc: only a MAC would stop it
        length = struct.unpack_from("<I", stream, start + 12)[0]
        struct.pack_into("<I", forged, start + 24, 0)
        end = start + HEADER.size + length
        struct.pack_into("<I", forged, start + 24, zlib.crc32(forged[start:end]))
    got = check_against_model(bytes(forged))
    assert len(got) >= k  # the frames before the forged one are intact
    if value != old and not recompute:
        assert len(got) == k, "a header whose crc no longer matches was taken as valid"


@fuzz(200)
@given(frame_streams(), st.data())
def test_recv_of_a_stream_with_one_flipped_bit(valid, data):
    """crc32 detects every single-bit error: the frame holding it and all after it are lost."""
    stream, offsets = valid
    bit = data.draw(st.integers(0, 8 * len(stream) - 1))
    flipped = bytearray(stream)
    flipped[bit // 8] ^= 1 << (bit % 8)
    got = check_against_model(bytes(flipped))
    assert len(got) == sum(1 for o in offsets if o <= bit // 8) - 1


@fuzz(150)
@given(frame_streams(), st.data())
def test_recv_of_mutated_streams(valid, data):
    stream, _ = valid
    check_against_model(data.draw(mutations(stream, max_ops=6)))


@fuzz(60)
@given(frame_streams(), st.data())
def test_recv_of_a_stream_arriving_in_small_pieces(valid, data):
    stream, _ = valid
    stream = data.draw(st.one_of(st.just(stream), mutations(stream)))
    pieces = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=40))
    check_against_model(stream, pieces=pieces)


def mostly(valid: int, width: int) -> st.SearchStrategy[int]:
    """`valid` most of the time, else any value of `width` bytes."""
    return st.one_of(st.just(valid), st.just(valid), st.integers(0, 2 ** (8 * width) - 1))


@fuzz(150)
@given(st.data())
def test_recv_of_forged_headers_with_a_valid_magic(data):
    """Headers with a valid magic whose every other field is right or random, with a correct
    crc most of the time: recv gets past each check in turn and must apply all of them."""
    payload = data.draw(st.binary(max_size=64), label="payload")
    version = data.draw(mostly(V, 2), label="version")
    ftype = data.draw(st.one_of(st.sampled_from(p.FrameType), st.integers(0, 2**16 - 1)))
    flags = data.draw(
        st.one_of(st.just(0), st.just(0), st.just(p.FLAG_MAC), st.integers(0, 2**32 - 1))
    )
    length = data.draw(
        st.one_of(
            st.just(len(payload)),
            st.just(len(payload)),
            st.integers(0, 2 * MAX_PAYLOAD),
            st.integers(0, 2**32 - 1),
        )
    )
    seq = data.draw(mostly(1, 8), label="seq")
    reserved = data.draw(mostly(0, 4), label="reserved")
    header = HEADER.pack(MAGIC, version, ftype, flags, length, seq, 0, reserved)
    crc = zlib.crc32(payload[:length], zlib.crc32(header))
    crc = data.draw(mostly(crc, 4), label="crc")
    header = HEADER.pack(MAGIC, version, ftype, flags, length, seq, crc, reserved)
    check_against_model(header + payload + data.draw(st.binary(max_size=32), label="tail"))


def test_recv_refuses_a_length_beyond_max_payload_before_reading_it():
    got, error = receive_all(frame_bytes(p.FrameType.PING, 1, bytes(MAX_PAYLOAD + 1)))
    assert got == [] and "exceeds the maximum" in str(error)


# ---- with frame authentication on (the keys the handshake sets)

KEY_A = hashlib.sha256(b"key a").digest()
KEY_B = hashlib.sha256(b"key b").digest()


def tagged_stream(msgs: list[p.Message]) -> bytes:
    """What an authenticated FramedConnection sends for `msgs`, captured from a socketpair."""
    a, b = socket.socketpair()
    with a, b:
        sender = p.FramedConnection(a)
        sender.authenticate(KEY_A, KEY_B)
        for message in msgs:
            sender.send_message(message)
        a.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := b.recv(65536):
            out += chunk
        return out


@fuzz(150)
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_authenticated_recv_yields_only_a_prefix_of_what_was_sent(msgs, data):
    """Whatever is done to the tagged stream (flips, forged fields, cuts, insertions), the
    receiver gets the frames that were sent, in order, and then an error - nothing else."""
    stream = tagged_stream(msgs)
    mutated = data.draw(st.one_of(mutations(stream, max_ops=3), st.just(stream)))
    writer, reader = socket.socketpair()
    with writer, reader:
        reader.settimeout(10)
        writer.sendall(mutated)
        writer.shutdown(socket.SHUT_WR)
        conn = p.FramedConnection(reader, max_payload=MAX_PAYLOAD)
        conn.authenticate(KEY_B, KEY_A)
        received = 0
        while True:
            try:
                message = conn.recv_message()  # its data is valid until the next recv only
            except ProtocolError as exc:
                error = exc
                break
            assert received < len(msgs) and message == msgs[received], (
                f"an authenticated connection accepted a changed frame {received + 1}"
            )
            received += 1
    event(f"authenticated recv: {received} of {len(msgs)} frames, then {type(error).__name__}")
    if mutated == stream:
        assert received == len(msgs) and isinstance(error, ConnectionClosed), error


# ---------------------------------------------------------------------------------------------
# 3. The handshake, against a peer driven by the test
# ---------------------------------------------------------------------------------------------

LOCAL = {
    p.Role.SOURCE: (
        p.HandshakeInfo("r0", "alpha", p.Role.SOURCE, 2 * GiB, 4096, p.Generations(5, (4,))),
        p.Expect(frozenset({"beta"})),
    ),
    p.Role.TARGET: (
        p.HandshakeInfo("r0", "beta", p.Role.TARGET, 3 * GiB, 4096, p.Generations(5, (4,))),
        p.Expect(frozenset({"alpha", "gamma"})),
    ),
}
OTHER = {p.Role.SOURCE: p.Role.TARGET, p.Role.TARGET: p.Role.SOURCE}
roles = st.sampled_from(p.Role)
# A HELLO that a peer could plausibly send: mostly the right resource and names, so that the
# handshake gets past its first checks, with every field sometimes wrong.
plausible_hellos = hellos(
    version=st.sampled_from([V, V, V, 0, V + 1, 0xFFFF]),
    names=st.sampled_from(["r0", "alpha", "beta", "gamma", "r1", "x" * 255]),
    sizes=st.sampled_from([2 * GiB, 3 * GiB, 1 * GiB, 0, 2**64 - 1]),
    chunks=st.sampled_from([4096, 4096, 512, 0, 2**32 - 1]),
)
handshake_messages = st.one_of(
    plausible_hellos,
    hellos(),
    MESSAGES[p.FrameType.CHALLENGE_RESPONSE],
    st.just(p.Welcome()),
    MESSAGES[p.FrameType.REFUSE],
    MESSAGES[p.FrameType.ERROR],
    messages,
)


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run `fn` in a thread; the returned callable joins it and returns its result or exception."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["result"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(20)
        assert not thread.is_alive(), "the handshake hung"
        return box["result"]

    return join


def run_handshake(
    role: p.Role, peer: Callable[[socket.socket], None], *, timeout: float = TIMEOUT
) -> Any:
    """Run `handshake` as `role` on one end of a socketpair while `peer` drives the other end;
    return the handshake's PeerInfo or exception.

    The peer then behaves: it shuts down its sending half and reads until the handshake side
    closes, so that neither side sees a reset and a refusing side does not linger.
    """
    ours, theirs = socket.socketpair()
    theirs.settimeout(20)
    local, expect = LOCAL[role]

    def side() -> p.PeerInfo:
        conn = p.FramedConnection(ours)
        try:
            return p.handshake(conn, local, SECRET, expect, timeout=timeout)
        finally:
            conn.close()  # as the daemon does

    join = in_thread(side)
    try:
        peer(theirs)
    except (OSError, ProtocolError):
        pass  # the handshake side refused and closed while the peer was still talking
    finally:
        try:
            theirs.shutdown(socket.SHUT_WR)
            while theirs.recv(65536):
                pass
        except OSError:
            pass
        theirs.close()
    return join()


def check_failed(result: Any) -> BaseException:
    """The handshake must have failed with one of the protocol's documented errors."""
    if not isinstance(result, BaseException):
        raise AssertionError(f"the handshake accepted a peer not knowing the secret: {result}")
    if not isinstance(result, (ProtocolError, HandshakeRefused)):
        raise result  # the unexpected exception, with its traceback
    if isinstance(result, HandshakeRefused):
        who = "by the peer" if result.remote else "by us"
        event(f"handshake: {type(result).__name__} {who} ({_reason(result.reason)})")
    else:
        what = " ".join(re.sub(r"[0-9]+", "N", str(result).split("b'")[0]).split()[:5])
        event(f"handshake: {type(result).__name__} ({what} ...)")
    return result


def _reason(reason: int) -> str:
    try:
        return p.RefuseReason(reason).name
    except ValueError:
        return str(reason)


def send_bytes(data: bytes) -> Callable[[socket.socket], None]:
    return lambda sock: sock.sendall(data)


@fuzz(150)
@given(roles, st.one_of(st.binary(max_size=2048), st.binary(min_size=28, max_size=2048),
                        st.binary(min_size=28, max_size=1100).map(b"RPL1".__add__)))
@example(p.Role.TARGET, b"")
@example(p.Role.SOURCE, b"")
@example(p.Role.TARGET, b"SSH-2.0-OpenSSH_9.2\r\n")
@example(p.Role.TARGET, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64))  # a TLS hello
def test_handshake_against_arbitrary_bytes(role, data):
    check_failed(run_handshake(role, send_bytes(data)))


@st.composite
def frame_scripts(draw: st.DrawFn, role: p.Role) -> bytes:
    """Valid frames of any type in any order (correct seq and crc), often starting with a HELLO
    that `role` accepts, sometimes with one header field forged or a frame claiming a MAC, then
    sometimes garbage."""
    msgs = draw(st.lists(handshake_messages, min_size=1, max_size=5))
    if draw(st.booleans()):
        msgs.insert(0, honest_hello(role, draw(nonces)))
    stream, offsets = stream_of(msgs)
    forged = bytearray(stream)
    if draw(st.booleans()):
        k = draw(st.integers(0, len(offsets) - 1))
        name = draw(st.sampled_from(sorted(HEADER_FIELDS)))
        offset, fmt = HEADER_FIELDS[name]
        value = draw(st.integers(0, 2 ** (8 * struct.calcsize(fmt)) - 1))
        struct.pack_into(fmt, forged, offsets[k] + offset, value)
    if draw(st.booleans()):  # a frame with FLAG_MAC and a random tag, as if after the handshake
        message = draw(handshake_messages)
        payload = payload_of(message)
        header = HEADER.pack(MAGIC, V, message.frame_type, p.FLAG_MAC, len(payload),
                             len(msgs) + 1, 0, 0)  # fmt: skip
        forged += header + payload + draw(st.binary(min_size=16, max_size=16))
    return bytes(forged) + draw(st.one_of(st.just(b""), st.binary(max_size=128)))


@fuzz(200)
@given(roles.flatmap(lambda role: st.tuples(st.just(role), frame_scripts(role))))
def test_handshake_against_valid_frames_in_any_order(case):
    role, script = case
    check_failed(run_handshake(role, send_bytes(script)))


@fuzz(150)
@given(
    roles,
    plausible_hellos,
    st.booleans(),
    st.sampled_from(["garbage", "proof", "proof+welcome"]),
    st.binary(max_size=256),
)
def test_handshake_against_a_hello_then_garbage(role, hello, make_acceptable, kind, data):
    """A HELLO (half the time one that passes the first checks), then random bytes, or a
    CHALLENGE_RESPONSE of random bytes (a wrong MAC), or that and the WELCOME that would follow."""
    if make_acceptable:
        hello = honest_hello(role, hello.nonce)
    script = frame_bytes(p.FrameType.HELLO, 1, payload_of(hello))
    if kind == "garbage":
        script += data
    else:
        script += frame_bytes(p.FrameType.CHALLENGE_RESPONSE, 2, hashlib.sha256(data).digest())
        if kind == "proof+welcome":
            script += frame_bytes(p.FrameType.WELCOME, 3, b"")
    error = check_failed(run_handshake(role, send_bytes(script)))
    if kind != "garbage" and hello.protocol_version == p.PROTOCOL_VERSION and hello.resource == "r0":
        # past the checks before authentication, a wrong proof is an AUTH_FAILED refusal
        assert isinstance(error, AuthError) and not error.remote, repr(error)


@fuzz(4)
@given(roles, st.data())
def test_handshake_ends_at_its_deadline_when_the_peer_stops_sending(role, data):
    """A peer that sends part of the exchange and then nothing, without closing: the handshake
    gives up after its timeout with a ProtocolError (not a bare TimeoutError)."""
    hello = honest_hello(role, b"n" * 32)
    script = frame_bytes(p.FrameType.HELLO, 1, payload_of(hello))
    script = script[: data.draw(st.integers(0, len(script)))]

    def stall(sock: socket.socket) -> None:
        sock.sendall(script)
        while sock.recv(65536):  # neither send nor close until the handshake side gives up
            pass

    t0 = time.monotonic()
    error = check_failed(run_handshake(role, stall))
    elapsed = time.monotonic() - t0
    assert "timed out" in str(error), error
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 5, elapsed


def wait_for_bytes(sock: socket.socket, n: int) -> None:
    """Wait until `n` bytes are waiting unread in `sock`."""
    deadline = time.monotonic() + 10
    while len(sock.recv(n, socket.MSG_PEEK)) < n:
        assert time.monotonic() < deadline, "the handshake side sent less than expected"
        time.sleep(0.005)


@pytest.mark.parametrize("role", list(p.Role), ids=lambda role: role.name)
def test_handshake_turns_a_reset_by_the_peer_into_a_protocol_error(role):
    """The peer closes with our frames unread (as a crashed or killed peer does, or a reset on
    the way): the handshake, blocked in recv at that moment, must fail with ProtocolError."""
    hello = honest_hello(role, b"r" * 32)

    def reset(sock: socket.socket) -> None:
        if role is p.Role.TARGET:  # we are the source: HELLO first
            sock.sendall(frame_bytes(p.FrameType.HELLO, 1, payload_of(hello)))
            their = HEADER.size + 88 + 3 + len("r0") + len("beta") + len("alpha")
            wait_for_bytes(sock, their + HEADER.size + p.MAC_SIZE)  # their HELLO and proof
        else:
            wait_for_bytes(sock, HEADER.size + 88 + 3 + len("r0") + len("alpha") + len("beta"))
        sock.close()  # with their frames unread: the kernel resets the connection

    ours, theirs = socket.socketpair()
    local, expect = LOCAL[role]
    conn = p.FramedConnection(ours)
    with ours:
        peer = in_thread(lambda: reset(theirs))
        try:
            with pytest.raises(ProtocolError):
                p.handshake(conn, local, SECRET, expect, timeout=5)
        finally:
            assert peer() is None


# ---- a peer that speaks the protocol, computing its proof from docs/protocol.md


def auth_mac(secret: bytes, sender: p.Hello, sender_payload: bytes, receiver: p.Hello,
             receiver_payload: bytes) -> bytes:  # fmt: skip
    """The CHALLENGE_RESPONSE of `sender`, as docs/protocol.md, "Authentication", defines it."""
    msg = b"repl-auth-v1" + bytes([sender.role]) + sender.nonce + receiver.nonce
    for name in (sender.resource, sender.node, receiver.node):
        msg += bytes([len(name.encode())]) + name.encode()
    msg += hashlib.sha256(sender_payload).digest() + hashlib.sha256(receiver_payload).digest()
    return hmac.new(secret, msg, hashlib.sha256).digest()


def session_keys(secret: bytes, source: p.Hello, source_payload: bytes, target: p.Hello,
                 target_payload: bytes) -> tuple[bytes, bytes]:  # fmt: skip
    """(k_source, k_target), as docs/protocol.md, "Frame authentication", defines them."""
    session = hmac.new(
        secret,
        b"repl-session-v1" + source.nonce + target.nonce
        + hashlib.sha256(source_payload).digest() + hashlib.sha256(target_payload).digest(),
        hashlib.sha256,
    ).digest()  # fmt: skip
    return (
        hmac.new(session, b"source->target", hashlib.sha256).digest(),
        hmac.new(session, b"target->source", hashlib.sha256).digest(),
    )


PROOFS = ["correct", "other secret", "over another hello", "echo", "random", "none"]
WELCOMES = ["tagged", "plain", "wrong key", "refuse", "none"]


@dataclass
class Peer:
    """The other side of the handshake, played by the test; records what it did.

    It sends `hello` as is, with a CHALLENGE_RESPONSE chosen by `proof` and a WELCOME chosen by
    `welcome`, and computes the proof and the session keys from docs/protocol.md, not from the
    code under test.
    """

    role: p.Role  # the role it plays
    hello: p.Hello  # the HELLO it sends
    proof: str  # one of PROOFS
    welcome: str  # one of WELCOMES
    stale: p.Hello | None = None  # for "over another hello": the HELLO the proof is computed over
    proof_correct: bool = False  # it sent the right proof with the shared secret
    their_proof_ok: bool | None = None  # the handshake side's proof is the one the docs define

    def __call__(self, sock: socket.socket) -> None:
        conn = p.FramedConnection(sock, max_payload=MAX_PAYLOAD)
        mine, mine_payload = self.hello, payload_of(self.hello)
        if self.role is p.Role.SOURCE:  # the source speaks first
            conn.send(p.FrameType.HELLO, mine_payload)
            theirs, theirs_payload = self._receive_hello(conn)
        else:
            theirs, theirs_payload = self._receive_hello(conn)
            conn.send(p.FrameType.HELLO, mine_payload)
        right = auth_mac(SECRET, mine, mine_payload, theirs, theirs_payload)

        if self.proof == "none":
            return
        if self.proof == "echo":  # their own proof sent back to them
            their_proof = self._receive_proof(conn)
            mac = their_proof
        else:
            if self.proof == "over another hello":  # as a relay that changed our HELLO would
                assert self.stale is not None
                mac = auth_mac(SECRET, self.stale, payload_of(self.stale), theirs, theirs_payload)
            elif self.proof == "other secret":
                mac = auth_mac(OTHER_SECRET, mine, mine_payload, theirs, theirs_payload)
            elif self.proof == "random":
                mac = hashlib.sha256(right).digest()
            else:
                mac = right
        self.proof_correct = hmac.compare_digest(mac, right)
        conn.send_message(p.ChallengeResponse(mac))
        if self.proof != "echo":
            their_proof = self._receive_proof(conn)
        self.their_proof_ok = hmac.compare_digest(
            their_proof, auth_mac(SECRET, theirs, theirs_payload, mine, mine_payload)
        )

        if self.welcome == "none":
            return
        if self.welcome == "refuse":
            conn.send_message(p.Refuse(p.RefuseReason.POLICY, "the test says no"))
            return
        if self.role is p.Role.SOURCE:
            k_source, k_target = session_keys(SECRET, mine, mine_payload, theirs, theirs_payload)
            send_key, recv_key = k_source, k_target
        else:
            k_source, k_target = session_keys(SECRET, theirs, theirs_payload, mine, mine_payload)
            send_key, recv_key = k_target, k_source
        if self.welcome == "wrong key":
            send_key = hashlib.sha256(send_key).digest()
        if self.welcome != "plain":
            conn.authenticate(send_key, recv_key)
        conn.send_message(p.Welcome())
        if self.welcome == "tagged":
            # the handshake side's WELCOME, tagged under the keys the docs define
            assert conn.recv_message() == p.Welcome()

    def _receive_hello(self, conn: p.FramedConnection) -> tuple[p.Hello, bytes]:
        frame = conn.recv()
        if frame.type is not p.FrameType.HELLO:
            raise ProtocolError(f"got {frame.type.name}")  # a REFUSE: the peer stops
        payload = bytes(frame.payload)
        hello = p.decode(frame.type, memoryview(payload))
        assert isinstance(hello, p.Hello)
        return hello, payload

    def _receive_proof(self, conn: p.FramedConnection) -> bytes:
        message = conn.recv_message()
        if not isinstance(message, p.ChallengeResponse):
            raise ProtocolError(f"got {message}")  # a REFUSE: the peer stops
        return message.mac


def honest_hello(role: p.Role, nonce: bytes) -> p.Hello:
    """The HELLO of a peer that a handshake side of `role` (in LOCAL) accepts."""
    local, _ = LOCAL[role]
    node = "gamma" if role is p.Role.TARGET else "beta"
    return p.Hello(p.PROTOCOL_VERSION, OTHER[role], "r0", node, local.node, 2 * GiB, 4096, p.Generations(5, (4,)),
                   nonce)  # fmt: skip


HELLO_FIELDS = ["protocol_version", "role", "resource", "node", "peer", "device_size",
                "chunk_size", "generations", "nonce"]  # fmt: skip


def one_field_changed(hello: p.Hello) -> st.SearchStrategy[p.Hello]:
    """`hello` with one field taken from a plausible HELLO (sometimes the same value)."""
    return st.tuples(st.sampled_from(HELLO_FIELDS), plausible_hellos).map(
        lambda t: p.Hello(**{**hello.__dict__, t[0]: getattr(t[1], t[0])})
    )


@st.composite
def peers(draw: st.DrawFn) -> tuple[p.Role, Peer, bool]:
    """The role under test, the peer to run against it, and whether its HELLO is acceptable."""
    role = draw(roles, label="role under test")
    honest = honest_hello(role, draw(nonces))
    hello = draw(
        st.one_of(st.just(honest), st.just(honest), one_field_changed(honest), plausible_hellos),
        label="hello",
    )
    proof = draw(st.sampled_from(PROOFS), label="proof")
    welcome = draw(st.sampled_from(WELCOMES), label="welcome")
    stale = None
    if proof == "over another hello":  # the HELLO as the peer sent it, before a relay changed it
        stale = draw(one_field_changed(hello), label="stale hello")
        if stale == hello:
            stale = p.Hello(**{**hello.__dict__, "nonce": bytes(b ^ 1 for b in hello.nonce)})
    return role, Peer(OTHER[role], hello, proof, welcome, stale), hello == honest


@fuzz(300)
@given(peers())
@example((p.Role.SOURCE, Peer(p.Role.TARGET, honest_hello(p.Role.SOURCE, b"t" * 32), "correct",
                              "tagged"), True))  # fmt: skip
@example((p.Role.TARGET, Peer(p.Role.SOURCE, honest_hello(p.Role.TARGET, b"s" * 32), "correct",
                              "tagged"), True))  # fmt: skip
def test_handshake_succeeds_only_with_the_proof_of_the_secret(case):
    role, peer, honest = case
    result = run_handshake(role, peer, timeout=5)
    genuine = peer.proof_correct and peer.welcome == "tagged"
    if isinstance(result, BaseException):
        check_failed(result)
        # the positive control: a peer that does everything right is accepted
        assert not (genuine and honest), f"an honest peer was refused: {result!r}"
        return
    event("handshake: succeeded")
    assert genuine, f"accepted a peer whose proof was {peer.proof!r}, WELCOME {peer.welcome!r}"
    sent = peer.hello
    assert result == p.PeerInfo(sent.protocol_version, sent.resource, sent.node, sent.role,
                                sent.device_size, sent.chunk_size, sent.generations)  # fmt: skip
    # and the handshake side's own proof is the one docs/protocol.md defines
    assert peer.their_proof_ok
