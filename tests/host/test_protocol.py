"""Wire protocol: framing, payloads and handshake, over socketpairs and threads (no network)."""

from __future__ import annotations

import hashlib
import hmac
import random
import re
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from repctl import protocol as p
from repctl.errors import (
    AuthError,
    ConnectionClosed,
    HandshakeRefused,
    ProtocolError,
    ReplError,
)

GiB = 1 << 30
SECRET = b"correct horse battery staple"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    ca, cb = p.FramedConnection(a), p.FramedConnection(b)
    yield ca, cb
    a.close()
    b.close()


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run `fn` in a thread; the returned callable joins it and returns its result or exception."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["result"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join() -> Any:
        t.join(10)
        assert not t.is_alive(), "thread hung"
        return box["result"]

    return join


def raw_frame(
    frame_type: int,
    seq: int,
    payload: bytes = b"",
    *,
    magic: int = p.MAGIC,
    version: int = p.PROTOCOL_VERSION,
    flags: int = 0,
    length: int | None = None,
    crc: int | None = None,
) -> bytes:
    """A frame built by hand, so that tests can forge every field."""
    n = len(payload) if length is None else length
    header = p.HEADER.pack(magic, version, frame_type, flags, n, seq, 0, 0)
    if crc is None:
        crc = zlib.crc32(payload, zlib.crc32(header))
    return p.HEADER.pack(magic, version, frame_type, flags, n, seq, crc, 0) + payload


# ---------------------------------------------------------------------------------------------
# The header and the enums are data that never change
# ---------------------------------------------------------------------------------------------


def test_header_layout_is_32_bytes_little_endian():
    assert p.HEADER.size == p.HEADER_SIZE == 32
    (header, *_) = p.encode_frame(p.FrameType.PING, 7, [b"x" * 16])
    raw = bytes(header)
    assert raw[:4] == b"RPL1"
    assert struct.unpack_from("<H", raw, 4)[0] == p.PROTOCOL_VERSION
    assert struct.unpack_from("<H", raw, 6)[0] == p.FrameType.PING
    assert struct.unpack_from("<I", raw, 12)[0] == 16
    assert struct.unpack_from("<Q", raw, 16)[0] == 7
    zeroed = raw[:24] + b"\0\0\0\0" + raw[28:]
    assert struct.unpack_from("<I", raw, 24)[0] == zlib.crc32(b"x" * 16, zlib.crc32(zeroed))


def test_frame_type_numbers_are_fixed():
    # Changing one of these breaks every deployed peer: append, never renumber.
    assert {t.name: t.value for t in p.FrameType} == {
        "HELLO": 1, "CHALLENGE_RESPONSE": 2, "WELCOME": 3, "REFUSE": 4,
        "WRITE": 16, "FLUSH": 17, "DISCARD": 18, "WRITE_ZEROES": 19, "ACK": 20, "RECORDS": 21,
        "RESYNC_CHUNK": 32, "RESYNC_DONE": 33, "CSUM_REQUEST": 34, "CSUM_REPLY": 35, "OUT_OF_SYNC": 36,
        "PAUSE": 48, "RESUME": 49, "PING": 50, "PONG": 51, "ERROR": 63,
    }  # fmt: skip
    assert [r.value for r in p.RefuseReason] == list(range(1, 12))


def test_record_ops_match_the_kernel_uapi():
    header = Path(__file__).resolve().parents[2] / "kmod" / "dm-repl-uapi.h"
    if not header.exists():
        pytest.skip("kmod/dm-repl-uapi.h is not there")
    text = header.read_text()
    for op in p.RecordOp:
        assert re.search(rf"#define REPL_OP_{op.name} {op.value}\b", text), op
    assert re.search(rf"#define REPL_REC_FUA {int(p.RecordFlags.FUA)}\b", text)


def test_docs_list_every_frame_type_and_reason():
    if not DOCS.exists():
        pytest.skip("docs/protocol.md is not there")
    text = DOCS.read_text()
    for t in p.FrameType:
        assert re.search(rf"\|\s*{t.value}\s*\|\s*`?{t.name}`?\s*\|", text), t.name
    for r in p.RefuseReason:
        assert re.search(rf"\|\s*{r.value}\s*\|\s*`?{r.name}`?\s*\|", text), r.name


# ---------------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------------

HELLO = p.Hello(
    p.PROTOCOL_VERSION, p.Role.SOURCE, "r0", "alpha", "beta", 2 * GiB, 4096,
    p.Generations(0xDEADBEEF, (3, 2, 1)), bytes(range(32)),
)  # fmt: skip

EVERY_MESSAGE: list[p.Message] = [
    HELLO,
    p.ChallengeResponse(b"\x01" * 32),
    p.Welcome(),
    p.Refuse(p.RefuseReason.DEVICE_TOO_SMALL, "target device 1.0 GiB is smaller"),
    p.write_record(41, 2048, bytes(range(256)) * 16, p.RecordFlags.FUA),
    p.Record(p.RecordOp.FLUSH, 42),
    p.Record(p.RecordOp.DISCARD, 43, 8, 1 << 20),
    p.Record(p.RecordOp.WRITE_ZEROES, 44, 16, 4096),
    p.Records((p.write_record(45, 8, b"\x5a" * 4096), p.Record(p.RecordOp.FLUSH, 46),
               p.Record(p.RecordOp.DISCARD, 47, 8, 4096),
               p.write_record(48, 0, b"\xa5" * 512, p.RecordFlags.FUA))),
    p.Ack(44, durable=True),
    p.ResyncChunk(12345, b"\xab" * 65536),
    p.ResyncDone(99),
    p.CsumRequest(1000, 64, p.DigestAlgorithm.SHA256),
    p.CsumReply(1000, (b"\x11" * 32, b"\x22" * 32), p.DigestAlgorithm.SHA256),
    p.OutOfSync(4 << 20, b"\x00\x81" * 64, True),
    p.Pause(),
    p.Resume(),
    p.Ping(7, 123456789),
    p.Pong(7, 123456789),
    p.Error(p.ErrorCode.IO_ERROR, "write to /dev/vg0/data failed: EIO"),
]


def test_every_frame_type_has_a_message_in_the_round_trip():
    assert {m.frame_type for m in EVERY_MESSAGE} == set(p.FrameType)


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: m.frame_type.name)
def test_payload_round_trip(message):
    frame_type, parts = p.encode(message)
    payload = memoryview(b"".join(bytes(x) for x in parts))
    assert p.decode(frame_type, payload) == message


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: m.frame_type.name)
def test_message_round_trip_over_a_connection(pair, message):
    a, b = pair
    assert a.send_message(message) == 1
    assert b.recv_message() == message
    assert b.frames_received == 1


def test_write_data_is_sent_without_copying():
    ring = bytearray(1 << 20)
    data = memoryview(ring)[4096 : 4096 + 65536]
    frame_type, parts = p.encode(p.write_record(1, 8, data))
    views = p.encode_frame(frame_type, 1, parts)
    assert len(views) == 3  # header, record head, data
    assert views[0].nbytes == p.HEADER_SIZE
    assert views[2].obj is ring  # the ring itself, not a copy


def test_recv_reads_into_the_given_buffer(pair):
    a, b = pair
    a.send_message(p.ResyncChunk(3, b"\x5a" * 8192))
    buffer = bytearray(1 << 16)
    frame = b.recv(buffer)
    assert frame.payload.obj is buffer
    chunk = p.decode(frame.type, frame.payload)
    assert chunk.data == b"\x5a" * 8192 and chunk.data.obj is buffer


@pytest.mark.parametrize(
    ("frame_type", "payload", "message"),
    [
        (p.FrameType.WRITE, p.RECORD.pack(1, 0, 4096, 1, 0) + b"x" * 100, "says 4096 bytes"),
        (p.FrameType.WRITE, p.RECORD.pack(1, 0, 512, 3, 0) + b"x" * 512, "op 3"),
        (p.FrameType.WRITE, p.RECORD.pack(1, 0, 512, 1, 8) + b"x" * 512, "unknown flags"),
        (p.FrameType.WRITE, p.RECORD.pack(1, 0, 100, 1, 0) + b"x" * 100, "multiple of 512"),
        (p.FrameType.FLUSH, p.RECORD.pack(1, 5, 0, 2, 0), "sector or a length"),
        (p.FrameType.DISCARD, p.RECORD.pack(1, 0, 512, 3, 0) + b"x", "carries 1 data bytes"),
        (p.FrameType.WRITE, b"short", "expected at least 24"),
        # RECORDS: every record checked as in a frame of its own, and consecutive
        (p.FrameType.RECORDS, b"", "carries no record"),
        (p.FrameType.RECORDS, p.RECORD.pack(1, 0, 0, 2, 0) + b"x" * 10, "inside a record head"),
        (p.FrameType.RECORDS, p.RECORD.pack(1, 0, 4096, 1, 0) + b"x" * 100,
         "inside WRITE record 1 (100 of its 4096 bytes)"),
        (p.FrameType.RECORDS, p.RECORD.pack(1, 0, 0, 2, 0) + p.RECORD.pack(3, 0, 0, 2, 0),
         "record 3 after record 1: its records must be consecutive"),
        (p.FrameType.RECORDS, p.RECORD.pack(1, 0, 0, 2, 0) + p.RECORD.pack(1, 0, 0, 2, 0),
         "record 1 after record 1"),
        (p.FrameType.RECORDS, p.RECORD.pack(1, 0, 0, 2, 0) + p.RECORD.pack(2, 0, 512, 9, 0),
         "record 2 with unknown op 9"),
        (p.FrameType.RECORDS, p.RECORD.pack(1, 0, 512, 1, 8) + b"x" * 512, "unknown flags"),
        (p.FrameType.RECORDS, p.RECORD.pack(1, 5, 0, 2, 0), "sector or a length"),
        (p.FrameType.RECORDS, p.RECORD.pack(1, 0, 100, 1, 0) + b"x" * 100, "multiple of 512"),
        (p.FrameType.RECORDS, p.RECORD.pack(1, 0, 0, 3, 0), "DISCARD record 1 has length 0"),
        (p.FrameType.ACK, struct.pack("<QII", 1, 2, 0), "unknown flags"),
        (p.FrameType.WELCOME, b"x", "WELCOME payload has 1 bytes, expected 0"),
        (p.FrameType.CHALLENGE_RESPONSE, b"x" * 31, "expected 32"),
        (p.FrameType.CSUM_REQUEST, struct.pack("<QIHH", 0, 0, 1, 0), "0 chunks"),
        (p.FrameType.CSUM_REQUEST, struct.pack("<QIHH", 0, 1, 9, 0), "unknown digest"),
        (p.FrameType.CSUM_REPLY, struct.pack("<QIHH", 0, 2, 1, 32) + b"x" * 32, "2 digests"),
        (p.FrameType.RESYNC_CHUNK, struct.pack("<Q", 1) + b"x" * 100, "multiple of 512"),
        (p.FrameType.REFUSE, b"\x01\x00" + b"x" * 2000, "at most 1024"),
        (p.FrameType.HELLO, b"\x01\x00", "at least 88"),
        (p.FrameType.HELLO, HELLO.encode()[0][:-7], "malformed peer name"),
        # version 3: 4 bytes after the names (compression, reserved)
        (p.FrameType.HELLO, bytes(HELLO.encode()[0]) + b"!", "5 bytes after its names, expected 4"),
        (p.FrameType.HELLO, HELLO.encode()[0][:-1], "3 bytes after its names, expected 4"),
        (p.FrameType.HELLO, bytes(HELLO.encode()[0])[:-1] + b"\x01", "non-zero reserved bytes"),
    ],
)
def test_malformed_payloads_are_protocol_errors(frame_type, payload, message):
    with pytest.raises(ProtocolError, match=re.escape(message)):
        p.decode(frame_type, memoryview(payload))


def test_hello_rejects_a_malformed_history_and_a_hostile_name():
    good = bytearray(HELLO.encode()[0])
    bad = bytearray(good)
    bad[3] = 5  # history count above 4
    with pytest.raises(ProtocolError, match="generation history"):
        p.Hello.decode(memoryview(bad))
    name = b"\x1b[2J"  # a terminal escape must not reach a log or a terminal
    hostile = (
        good[: p.Hello.FIXED.size] + bytes([len(name)]) + name + good[p.Hello.FIXED.size + 3 :]
    )
    with pytest.raises(ProtocolError, match="malformed resource name '\ufffd\\[2J'"):
        p.Hello.decode(memoryview(hostile))


def test_texts_are_made_printable_and_unknown_codes_kept():
    payload = struct.pack("<H", 200) + "bad\x1b[31m \u00e9t\u00e9".encode()
    refusal = p.decode(p.FrameType.REFUSE, memoryview(payload))
    assert refusal.reason == 200 and refusal.text == "bad\ufffd[31m \u00e9t\u00e9"


# ---------------------------------------------------------------------------------------------
# Framing errors: each a clear ProtocolError
# ---------------------------------------------------------------------------------------------


def forged(pair, data: bytes, *, close: bool = False) -> ProtocolError:
    a, b = pair
    a.sock.sendall(data)
    if close:
        a.sock.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError) as info:
        b.recv()
    return info.value


def test_flipped_payload_byte_is_a_bad_crc(pair):
    frame = bytearray(raw_frame(p.FrameType.RESYNC_CHUNK, 1, struct.pack("<Q", 1) + b"z" * 4096))
    frame[100] ^= 0x01
    assert "bad crc in frame 1 (RESYNC_CHUNK" in str(forged(pair, bytes(frame)))


def test_flipped_header_byte_is_a_bad_crc(pair):
    frame = bytearray(raw_frame(p.FrameType.PING, 1, bytes(16)))
    frame[17] ^= 0x01  # the sequence number
    assert "bad crc" in str(forged(pair, bytes(frame)))


def test_truncated_payload_names_what_was_missing(pair):
    frame = raw_frame(p.FrameType.RESYNC_CHUNK, 1, b"y" * 4096)
    error = forged(pair, frame[: p.HEADER_SIZE + 100], close=True)
    assert str(error) == "truncated frame: expected 4096 payload bytes, got 100 before EOF"


def test_truncated_header(pair):
    error = forged(pair, raw_frame(p.FrameType.PING, 1, bytes(16))[:10], close=True)
    assert str(error) == "truncated frame: expected 32 header bytes, got 10 before EOF"


def test_orderly_close_between_frames(pair):
    a, b = pair
    a.send_message(p.Ping(1))
    a.sock.shutdown(socket.SHUT_WR)
    assert b.recv_message() == p.Ping(1)
    with pytest.raises(ConnectionClosed):
        b.recv()


def test_oversize_length_is_refused_before_reading(pair):
    error = forged(pair, raw_frame(p.FrameType.WRITE, 1, length=p.MAX_PAYLOAD + 1))
    assert f"frame length {p.MAX_PAYLOAD + 1} exceeds the maximum {p.MAX_PAYLOAD}" in str(error)


def test_unknown_frame_type(pair):
    assert str(forged(pair, raw_frame(99, 1, b"abc"))) == "unknown frame type 99"


def test_bad_magic(pair):
    error = forged(pair, raw_frame(p.FrameType.PING, 1, bytes(16), magic=0x50545448))
    assert "bad magic b'HTTP', expected b'RPL1'" in str(error)


def test_other_version(pair):
    error = forged(pair, raw_frame(p.FrameType.PING, 1, bytes(16), version=2))
    assert ("unsupported protocol version 2 in frame 1 "
            f"(this side speaks {p.PROTOCOL_VERSION})") in str(error)


def test_unknown_header_flags(pair):
    assert "unknown header flags 0x4" in str(
        forged(pair, raw_frame(p.FrameType.PING, 1, bytes(16), flags=4))
    )


@pytest.mark.parametrize(
    ("sequence", "bad"),
    [((1, 2, 4), "4, expected 3"), ((1, 1), "1, expected 2"), ((7,), "7, expected 1")],
)  # fmt: skip
def test_out_of_order_sequence(pair, sequence, bad):
    a, b = pair
    a.sock.sendall(b"".join(raw_frame(p.FrameType.PING, s, bytes(16)) for s in sequence))
    for _ in sequence[:-1]:
        b.recv()
    with pytest.raises(ProtocolError, match=f"^unexpected frame sequence {bad}$"):
        b.recv()


def test_connection_is_unusable_after_a_protocol_error(pair):
    a, b = pair
    a.sock.sendall(raw_frame(99, 1) + raw_frame(p.FrameType.PING, 2, bytes(16)))
    with pytest.raises(ProtocolError):
        b.recv()
    with pytest.raises(ProtocolError, match="unusable after an earlier error: unknown frame type"):
        b.recv()


def test_a_timeout_before_a_frame_leaves_the_connection_usable(pair):
    a, b = pair
    b.sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        b.recv()
    a.send_message(p.Ping(5))
    assert b.recv_message() == p.Ping(5)


def test_payload_larger_than_the_maximum_is_not_sent(pair):
    a, _ = pair
    with pytest.raises(ValueError, match="exceeds the maximum"):
        a.send(p.FrameType.RESYNC_CHUNK, bytes(p.MAX_PAYLOAD + 1))
    assert a.frames_sent == 0


# ---------------------------------------------------------------------------------------------
# Property-ish: random payload sizes, batches and partial sends
# ---------------------------------------------------------------------------------------------


def test_random_frames_arrive_intact_and_in_order():
    rng = random.Random(1234)
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # forces partial sendmsg
    sender, receiver = p.FramedConnection(a), p.FramedConnection(b)
    sizes = [0, 1, 31, 32, 33, 4095, 4096, 65537, 1 << 20, p.MAX_PAYLOAD]
    sizes += [rng.randrange(0, 300_000) for _ in range(60)]
    payloads = [rng.randbytes(n) for n in sizes]

    def send() -> None:
        for payload in payloads:
            cut = rng.randrange(0, len(payload) + 1)
            parts = [memoryview(payload)[:cut], memoryview(payload)[cut:]]
            sender.send(p.FrameType.RESYNC_CHUNK, *parts)

    join = in_thread(send)
    try:
        for seq, payload in enumerate(payloads, 1):
            frame = receiver.recv()
            assert frame.header.seq == seq and frame.header.length == len(payload)
            assert frame.payload == payload
        assert join() is None
    finally:
        a.close()
        b.close()


def test_batch_of_many_small_records_in_one_go(pair):
    a, b = pair
    data = memoryview(bytes(range(256)) * 8192)  # a 2 MiB "ring"
    records = [p.write_record(i, i * 8, data[i * 512 : (i + 1) * 512]) for i in range(1500)]
    join = in_thread(lambda: a.send_batch(p.encode(r) for r in records))
    for r in records:
        assert b.recv_message() == r
    assert join() == 1500


# ---------------------------------------------------------------------------------------------
# Handshake
# ---------------------------------------------------------------------------------------------


GENERATIONS = p.Generations(5, (4,))


def info(node: str, role: p.Role, *, size: int = 2 * GiB, chunk: int = 4096, resource: str = "r0",
         gens: p.Generations = GENERATIONS) -> p.HandshakeInfo:  # fmt: skip
    return p.HandshakeInfo(resource, node, role, size, chunk, gens)


def shake(
    source: p.HandshakeInfo,
    target: p.HandshakeInfo,
    *,
    source_secret: bytes = SECRET,
    target_secret: bytes = SECRET,
    source_expects: set[str] | None = None,
    target_expects: set[str] | None = None,
    target_check: Callable[[p.PeerInfo], None] | None = None,
) -> tuple[Any, Any]:
    """Run both sides of a handshake over a socketpair; return each side's result or exception."""
    a, b = socket.socketpair()

    def side(sock: socket.socket, *args: Any) -> Any:
        try:
            return p.handshake(p.FramedConnection(sock), *args, timeout=5)
        except BaseException:
            sock.close()  # a side that failed closes at once, as the daemon will
            raise

    with a, b:
        src = in_thread(
            lambda: side(a, source, source_secret, p.Expect(frozenset(source_expects or {"beta"})))
        )
        tgt = in_thread(lambda: side(b, target, target_secret,
                                     p.Expect(frozenset(target_expects or {"alpha", "gamma"}),
                                              target_check)))  # fmt: skip
        return src(), tgt()


def test_handshake_succeeds_and_returns_the_authenticated_peer():
    src, tgt = shake(info("alpha", p.Role.SOURCE), info("beta", p.Role.TARGET, size=3 * GiB))
    assert src == p.PeerInfo(p.PROTOCOL_VERSION, "r0", "beta", p.Role.TARGET, 3 * GiB, 4096, p.Generations(5, (4,)))
    assert tgt == p.PeerInfo(p.PROTOCOL_VERSION, "r0", "alpha", p.Role.SOURCE, 2 * GiB, 4096, p.Generations(5, (4,)))


def test_connection_streams_after_the_handshake():
    a, b = socket.socketpair()
    ca, cb = p.FramedConnection(a), p.FramedConnection(b)
    with a, b:
        tgt = in_thread(lambda: p.handshake(cb, info("beta", p.Role.TARGET), SECRET,
                                            p.Expect(frozenset({"alpha"}))))  # fmt: skip
        p.handshake(ca, info("alpha", p.Role.SOURCE), SECRET, p.Expect(frozenset({"beta"})))
        assert isinstance(tgt(), p.PeerInfo)
        ca.send_message(p.write_record(1, 0, b"d" * 512))
        assert cb.recv_message() == p.write_record(1, 0, b"d" * 512)
        cb.send_message(p.Ack(1, durable=True))
        assert ca.recv_message() == p.Ack(1, durable=True)


def test_wrong_secret_is_an_auth_error_on_both_sides():
    src, tgt = shake(info("alpha", p.Role.SOURCE), info("beta", p.Role.TARGET),
                     target_secret=b"another secret of some length")  # fmt: skip
    for err in (src, tgt):
        assert isinstance(err, AuthError), err
        assert err.reason == p.RefuseReason.AUTH_FAILED
        assert "shared secrets differ" in str(err)


def hand_rolled_target(conn: p.FramedConnection, mac: bytes | None = None) -> list[p.Message]:
    """A target that answers HELLO, then sends `mac` (or a wrong one); returns what it got."""
    got = [conn.recv_message()]
    hello = got[0]
    assert isinstance(hello, p.Hello)
    conn.send_message(p.Hello(p.PROTOCOL_VERSION, p.Role.TARGET, "r0", "beta", hello.node, 4 * GiB, 4096,
                              p.Generations(5), b"\x07" * 32))  # fmt: skip
    conn.send_message(p.ChallengeResponse(mac or b"\0" * 32))
    while True:
        try:
            got.append(conn.recv_message())
        except ConnectionClosed:
            conn.close()
            return got


def test_a_peer_with_a_bad_hmac_receives_refuse():
    a, b = socket.socketpair()
    ca, cb = p.FramedConnection(a), p.FramedConnection(b)
    with a, b:
        peer = in_thread(lambda: hand_rolled_target(cb))
        with pytest.raises(AuthError) as info_:
            p.handshake(ca, info("alpha", p.Role.SOURCE), SECRET, p.Expect(frozenset({"beta"})))
        assert info_.value.remote is False
        a.close()
        got = peer()
    assert [type(m) for m in got] == [p.Hello, p.ChallengeResponse, p.Refuse]
    assert got[2].reason == p.RefuseReason.AUTH_FAILED


def test_tampered_hello_fails_authentication():
    """A relay that changes a HELLO field (here the target's size) is caught by the HMAC."""
    s1, r1 = socket.socketpair()
    r2, t2 = socket.socketpair()
    relay_src, relay_tgt = p.FramedConnection(r1), p.FramedConnection(r2)

    def forward(src: p.FramedConnection, dst: p.FramedConnection) -> None:
        try:
            while True:
                message = src.recv_message()
                if isinstance(message, p.Hello) and message.role is p.Role.TARGET:
                    message = p.Hello(**{**message.__dict__, "device_size": 8 * GiB})
                dst.send_message(message)
        except (ReplError, OSError):
            dst.sock.shutdown(socket.SHUT_WR)

    relays = [in_thread(lambda: forward(relay_src, relay_tgt)),
              in_thread(lambda: forward(relay_tgt, relay_src))]  # fmt: skip
    src = in_thread(
        lambda: p.handshake(
            p.FramedConnection(s1),
            info("alpha", p.Role.SOURCE),
            SECRET,
            p.Expect(frozenset({"beta"})),
            timeout=5,
        )
    )
    tgt = in_thread(
        lambda: p.handshake(
            p.FramedConnection(t2),
            info("beta", p.Role.TARGET),
            SECRET,
            p.Expect(frozenset({"alpha"})),
            timeout=5,
        )
    )
    results = src(), tgt()
    for s in (s1, t2):
        s.close()
    for join in relays:
        join()
    for s in (r1, r2):
        s.close()
    assert all(isinstance(r, AuthError) for r in results), results


def test_wrong_resource_is_refused_before_authentication():
    src, tgt = shake(info("alpha", p.Role.SOURCE, resource="r1"), info("beta", p.Role.TARGET))
    assert isinstance(tgt, HandshakeRefused) and not tgt.remote
    assert isinstance(src, HandshakeRefused) and src.remote
    assert src.reason == tgt.reason == p.RefuseReason.UNKNOWN_RESOURCE
    assert "unknown resource 'r1': node beta serves 'r0'" in str(src)


def test_unexpected_node_is_refused():
    src, tgt = shake(info("delta", p.Role.SOURCE), info("beta", p.Role.TARGET))
    assert isinstance(tgt, HandshakeRefused) and not tgt.remote
    assert isinstance(src, HandshakeRefused) and src.remote
    assert src.reason == p.RefuseReason.UNEXPECTED_NODE
    assert "node 'delta' is not an expected peer of 'beta' for resource 'r0'" in str(src)


def test_source_reaching_the_wrong_node_is_refused():
    src, tgt = shake(info("alpha", p.Role.SOURCE), info("gamma", p.Role.TARGET))
    assert src.reason == tgt.reason == p.RefuseReason.UNEXPECTED_NODE
    assert "'alpha' wanted to reach node 'beta' but reached 'gamma'" in str(tgt)


def test_smaller_target_is_refused():
    src, tgt = shake(info("alpha", p.Role.SOURCE, size=2 * GiB),
                     info("beta", p.Role.TARGET, size=1 * GiB))  # fmt: skip
    for err in (src, tgt):
        assert isinstance(err, HandshakeRefused), err
        assert err.reason == p.RefuseReason.DEVICE_TOO_SMALL
        assert err.text == "target device 1.0 GiB is smaller than the source's 2.0 GiB"


def test_slightly_smaller_target_shows_exact_sizes():
    src, _ = shake(info("alpha", p.Role.SOURCE), info("beta", p.Role.TARGET, size=2 * GiB - 512))
    assert src.text.endswith(f"({2 * GiB - 512} < {2 * GiB} bytes)")


def test_different_chunk_size_is_refused():
    src, tgt = shake(info("alpha", p.Role.SOURCE), info("beta", p.Role.TARGET, chunk=65536))
    assert src.reason == tgt.reason == p.RefuseReason.CHUNK_SIZE_MISMATCH
    assert "'beta' has 64.0 KiB" in str(src)


def test_two_sources_are_a_role_conflict():
    src, other = shake(info("alpha", p.Role.SOURCE), info("beta", p.Role.SOURCE),
                       target_expects={"alpha"})  # fmt: skip
    assert src.reason == other.reason == p.RefuseReason.ROLE_CONFLICT
    assert "both 'alpha' and 'beta' claim the SOURCE role" in str(src)


def test_policy_check_refuses_a_split_brain():
    def check(peer: p.PeerInfo) -> None:
        local = p.Generations(9, (4,))
        if p.compare_generations(local, peer.generations) is p.GenerationRelation.DIVERGED:
            raise HandshakeRefused(p.RefuseReason.SPLIT_BRAIN, "split brain: data diverged after 4")

    src, tgt = shake(info("alpha", p.Role.SOURCE), info("beta", p.Role.TARGET),
                     target_check=check)  # fmt: skip
    assert isinstance(tgt, HandshakeRefused) and not tgt.remote
    assert isinstance(src, HandshakeRefused) and src.remote
    assert src.reason == p.RefuseReason.SPLIT_BRAIN and "diverged after 4" in src.text


def test_one_sided_refusal_reaches_the_peer_over_tcp():
    """Over TCP a close with unread data sends a reset; the refusing side's linger avoids it."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()

    def refuse_everyone(peer: p.PeerInfo) -> None:
        raise HandshakeRefused(p.RefuseReason.BUSY, f"{peer.node} is already connected")

    def target() -> Any:
        try:
            return p.handshake(p.FramedConnection(server), info("beta", p.Role.TARGET), SECRET,
                               p.Expect(frozenset({"alpha"}), refuse_everyone))  # fmt: skip
        finally:
            server.close()  # at once, with the source's WELCOME possibly unread

    with client:
        tgt = in_thread(target)
        with pytest.raises(HandshakeRefused) as src:
            p.handshake(p.FramedConnection(client), info("alpha", p.Role.SOURCE), SECRET,
                        p.Expect(frozenset({"beta"})))  # fmt: skip
    assert src.value.remote and src.value.reason == p.RefuseReason.BUSY
    assert "alpha is already connected" in str(src.value)
    assert isinstance(tgt(), HandshakeRefused)


def test_other_protocol_version_is_refused():
    a, b = socket.socketpair()
    ca, cb = p.FramedConnection(a), p.FramedConnection(b)
    with a, b:
        tgt = in_thread(lambda: p.handshake(cb, info("beta", p.Role.TARGET), SECRET,
                                            p.Expect(frozenset({"alpha"}))))  # fmt: skip
        future = p.PROTOCOL_VERSION + 1
        future_hello = struct.pack("<H", future) + b"whatever a later version puts here"
        a.sendall(raw_frame(p.FrameType.HELLO, 1, future_hello, version=future))
        refusal = ca.recv_message()
        a.close()
        err = tgt()
    assert isinstance(refusal, p.Refuse) and refusal.reason == p.RefuseReason.VERSION
    assert isinstance(err, HandshakeRefused)
    assert (f"protocol version {p.PROTOCOL_VERSION + 1} is not supported "
            f"(this side speaks {p.PROTOCOL_VERSION})") in str(err)


def test_unexpected_frame_in_the_handshake_is_a_protocol_error():
    a, b = socket.socketpair()
    ca, cb = p.FramedConnection(a), p.FramedConnection(b)
    with a, b:
        tgt = in_thread(lambda: p.handshake(cb, info("beta", p.Role.TARGET), SECRET,
                                            p.Expect(frozenset({"alpha"}))))  # fmt: skip
        ca.send_message(p.write_record(1, 0, bytes(512)))
        refusal = ca.recv_message()
        a.close()
        err = tgt()
    assert isinstance(refusal, p.Refuse) and refusal.reason == p.RefuseReason.PROTOCOL
    assert isinstance(err, ProtocolError)
    assert "expected a HELLO frame in the handshake, got WRITE" in str(err)


def test_silent_peer_times_out():
    a, b = socket.socketpair()
    with a, b, pytest.raises(ProtocolError, match="handshake timed out"):
        p.handshake(p.FramedConnection(b), info("beta", p.Role.TARGET), SECRET,
                    p.Expect(frozenset({"alpha"})), timeout=0.1)  # fmt: skip


def test_nonce_reflection_is_refused():
    a, b = socket.socketpair()
    ca, cb = p.FramedConnection(a), p.FramedConnection(b)
    with a, b:
        src = in_thread(lambda: p.handshake(ca, info("alpha", p.Role.SOURCE), SECRET,
                                            p.Expect(frozenset({"beta"}))))  # fmt: skip
        hello = cb.recv_message()
        cb.send_message(p.Hello(p.PROTOCOL_VERSION, p.Role.TARGET, "r0", "beta", "alpha", 2 * GiB, 4096,
                                p.Generations(1), hello.nonce))  # fmt: skip
        b.close()
        err = src()
    assert isinstance(err, AuthError) and "our own nonce" in str(err)


def test_mac_covers_the_documented_fields():
    digest_a, digest_b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    receiver = p.Hello(p.PROTOCOL_VERSION, p.Role.TARGET, "r0", "beta", "alpha", GiB, 4096, GENERATIONS, b"B" * 32)
    sender = p.Hello(p.PROTOCOL_VERSION, p.Role.SOURCE, "r0", "alpha", "beta", GiB, 4096, GENERATIONS, b"A" * 32)
    message = (
        b"repl-auth-v1" + b"\x01" + b"A" * 32 + b"B" * 32
        + b"\x02r0" + b"\x05alpha" + b"\x04beta" + digest_a + digest_b
    )  # fmt: skip
    expected = hmac.new(SECRET, message, hashlib.sha256).digest()
    assert p._auth_mac(SECRET, sender, digest_a, receiver, digest_b) == expected


def test_handshake_argument_errors():
    a, b = socket.socketpair()
    with a, b:
        conn = p.FramedConnection(a)
        with pytest.raises(ValueError, match="empty shared secret"):
            p.handshake(conn, info("alpha", p.Role.SOURCE), b"", p.Expect(frozenset({"beta"})))
        with pytest.raises(ValueError, match="exactly the one target"):
            p.handshake(conn, info("alpha", p.Role.SOURCE), SECRET,
                        p.Expect(frozenset({"beta", "gamma"})))  # fmt: skip
        with pytest.raises(TypeError):
            p.Expect("beta")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Generations
# ---------------------------------------------------------------------------------------------

R = p.GenerationRelation


@pytest.mark.parametrize(
    ("local", "peer", "relation"),
    [
        (p.Generations(5, (4,)), p.Generations(5, (4,)), R.EQUAL),
        (p.Generations(6, (5, 4)), p.Generations(5, (4,)), R.LOCAL_AHEAD),
        (p.Generations(5, (4,)), p.Generations(6, (5, 4)), R.PEER_AHEAD),
        (p.Generations(6, (5,)), p.Generations(0), R.LOCAL_AHEAD),
        (p.Generations(0), p.Generations(6, (5,)), R.PEER_AHEAD),
        (p.Generations(7, (5, 4)), p.Generations(6, (5, 4)), R.DIVERGED),
        (p.Generations(7, (1,)), p.Generations(8, (2,)), R.UNRELATED),
    ],
)
def test_compare_generations(local, peer, relation):
    assert p.compare_generations(local, peer) is relation


def test_generations_are_validated():
    with pytest.raises(ValueError):
        p.Generations(1, (1, 2, 3, 4, 5))
    with pytest.raises(ValueError):
        p.Generations(1, (0,))
    with pytest.raises(ValueError):
        p.Generations(-1)
