"""Frames after the handshake are authenticated; the handshake itself is bounded in time and size.

Issue 10, items 3 and 4: before, only a crc protected a WRITE, so anyone on the path could inject
or replay writes after a genuine handshake; and a peer trickling one byte at a time, or sending a
16 MiB "HELLO", held the listener as long as it liked. Socketpairs and threads, no network.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import pytest
from repctl import mac
from repctl import protocol as p
from repctl.errors import ProtocolError

SECRET = b"correct horse battery staple"


def info(node: str, role: p.Role) -> p.HandshakeInfo:
    return p.HandshakeInfo("r0", node, role, 1 << 30, 4096, p.Generations(5, (4,)))


class Relay:
    """A man in the middle: forwards source -> target frame by frame and may change the stream."""

    def __init__(self) -> None:
        self.src, self.src_relay = socket.socketpair()
        self.tgt_relay, self.tgt = socket.socketpair()
        self.frames: list[bytes] = []  # every frame the source sent, as raw bytes
        threading.Thread(target=self._back, daemon=True).start()

    def _back(self) -> None:
        try:
            while data := self.tgt_relay.recv(65536):
                self.src_relay.sendall(data)
        except OSError:
            pass  # the test closed the sockets

    def read_frame(self) -> bytes:
        head = self._exact(p.HEADER_SIZE)
        flags, length = struct.unpack_from("<II", head, 8)
        body = self._exact(length + (mac.TAG_SIZE if flags & p.FLAG_MAC else 0))
        frame = head + body
        self.frames.append(frame)
        return frame

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.src_relay.recv(n - len(out))
            assert chunk, "source closed"
            out += chunk
        return out

    def forward(self, frame: bytes) -> None:
        self.tgt_relay.sendall(frame)


@pytest.fixture
def relayed() -> Iterator[tuple[Relay, p.FramedConnection, p.FramedConnection]]:
    """A completed handshake through a relay; returns the relay and both connections."""
    r = Relay()
    source, target = p.FramedConnection(r.src), p.FramedConnection(r.tgt)
    box: dict[str, object] = {}

    def tgt_side() -> None:
        box["t"] = p.handshake(target, info("beta", p.Role.TARGET), SECRET,
                               p.Expect(frozenset({"alpha"})), timeout=5)  # fmt: skip

    def relay_handshake() -> None:
        for _ in range(3):  # HELLO, CHALLENGE_RESPONSE, WELCOME
            r.forward(r.read_frame())

    t = threading.Thread(target=tgt_side, daemon=True)
    rt = threading.Thread(target=relay_handshake, daemon=True)
    t.start()
    rt.start()
    p.handshake(source, info("alpha", p.Role.SOURCE), SECRET, p.Expect(frozenset({"beta"})),
                timeout=5)  # fmt: skip
    t.join(5)
    rt.join(5)
    assert isinstance(box["t"], p.PeerInfo)
    yield r, source, target
    for s in (r.src, r.src_relay, r.tgt_relay, r.tgt):
        s.close()


def test_poly1305_known_answer():
    # RFC 8439, section 2.5.2
    key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    assert mac.poly1305(key, b"Cryptographic Forum Research Group").hex() == (
        "a8061dc1305136c6c22b8baf0c0127a9")


def test_frames_after_the_handshake_carry_a_tag_and_pass(relayed):
    r, source, target = relayed
    assert source.authenticated and target.authenticated
    source.send_message(p.write_record(7, 8, b"d" * 512))
    frame = r.read_frame()
    flags, _length = struct.unpack_from("<II", frame, 8)
    assert flags == p.FLAG_MAC
    assert struct.unpack_from("<I", frame, 24)[0] == 0  # no crc: the tag covers it
    r.forward(frame)
    assert target.recv_message() == p.write_record(7, 8, b"d" * 512)


def _fix_crc(frame: bytearray) -> None:
    struct.pack_into("<I", frame, 24, 0)
    struct.pack_into("<I", frame, 24, zlib.crc32(frame))


def test_a_changed_write_is_refused(relayed):
    r, source, target = relayed
    source.send_message(p.write_record(1, 0, b"a" * 512))
    frame = bytearray(r.read_frame())
    frame[p.HEADER_SIZE + p.RECORD.size + 10] ^= 0x01  # one bit of the data
    r.forward(bytes(frame))
    with pytest.raises(ProtocolError, match="bad MAC in frame 4"):
        target.recv()


def test_an_injected_plain_frame_is_refused(relayed):
    r, _source, target = relayed
    # what an attacker without the key can make: a valid frame with a correct crc
    views = p.encode_frame(p.FrameType.WRITE, 4, p.write_record(1, 0, b"x" * 512).encode())
    r.forward(b"".join(bytes(v) for v in views))
    with pytest.raises(ProtocolError, match="carries no MAC"):
        target.recv()


def test_a_forged_tag_is_refused(relayed):
    r, _source, target = relayed
    rec = p.write_record(1, 0, b"x" * 512)
    views = p.encode_frame(p.FrameType.WRITE, 4, rec.encode(), mac=mac.FrameMac(b"k" * 32))
    r.forward(b"".join(bytes(v) for v in views))
    with pytest.raises(ProtocolError, match="bad MAC"):
        target.recv()


def test_a_replayed_frame_is_refused(relayed):
    r, source, target = relayed
    source.send_message(p.write_record(1, 0, b"a" * 512))
    first = r.read_frame()
    r.forward(first)
    assert target.recv_message().ring_seq == 1  # type: ignore[attr-defined]
    r.forward(first)  # the same bytes again
    with pytest.raises(ProtocolError, match="unexpected frame sequence 4, expected 5"):
        target.recv()


def test_reordered_frames_are_refused(relayed):
    r, source, target = relayed
    source.send_message(p.write_record(1, 0, b"a" * 512))
    source.send_message(p.write_record(2, 8, b"b" * 512))
    first, second = r.read_frame(), r.read_frame()
    r.forward(second)
    r.forward(first)
    with pytest.raises(ProtocolError, match="unexpected frame sequence 5, expected 4"):
        target.recv()


def test_a_changed_sequence_number_is_refused(relayed):
    r, source, target = relayed
    source.send_message(p.write_record(1, 0, b"a" * 512))
    source.send_message(p.write_record(2, 8, b"b" * 512))
    r.read_frame()  # dropped by the attacker
    second = bytearray(r.read_frame())
    struct.pack_into("<Q", second, 16, 4)  # pretend it is the next frame
    r.forward(bytes(second))
    with pytest.raises(ProtocolError, match="bad MAC in frame 4"):
        target.recv()


def test_frames_of_another_session_are_refused():
    """A frame recorded in one session is worthless in the next: the keys are per session."""
    r1 = Relay()
    captured = []
    for session in range(2):
        r = r1 if session == 0 else Relay()
        source, target = p.FramedConnection(r.src), p.FramedConnection(r.tgt)
        done = threading.Event()

        def tgt_side(target: p.FramedConnection = target) -> None:
            p.handshake(target, info("beta", p.Role.TARGET), SECRET, p.Expect(frozenset({"alpha"})))
            done.set()

        def relay(r: Relay = r) -> None:
            for _ in range(3):
                r.forward(r.read_frame())

        threading.Thread(target=tgt_side, daemon=True).start()
        threading.Thread(target=relay, daemon=True).start()
        p.handshake(source, info("alpha", p.Role.SOURCE), SECRET, p.Expect(frozenset({"beta"})))
        assert done.wait(5)
        if session == 0:
            source.send_message(p.write_record(1, 0, b"a" * 512))
            captured.append(r.read_frame())
        else:
            r.forward(captured[0])  # frame 4 of the first session as frame 4 of this one
            with pytest.raises(ProtocolError, match="bad MAC in frame 4"):
                target.recv()


def test_the_handshake_has_an_overall_deadline():
    """A peer sending one byte every 0.2 s never trips a per-recv timeout; the deadline ends it."""
    a, b = socket.socketpair()
    with a, b:
        hello = p.Hello(p.PROTOCOL_VERSION, p.Role.SOURCE, "r0", "alpha", "beta", 1 << 30, 4096,
                        p.Generations(5), b"n" * 32)  # fmt: skip
        frame = b"".join(bytes(v) for v in p.encode_frame(p.FrameType.HELLO, 1, hello.encode()))
        stop = threading.Event()

        def trickle() -> None:
            for byte in frame:
                if stop.wait(0.2):
                    return
                try:
                    a.send(bytes([byte]))
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(ProtocolError, match="did not finish it within 1 s"):
            p.handshake(p.FramedConnection(b), info("beta", p.Role.TARGET), SECRET,
                        p.Expect(frozenset({"alpha"})), timeout=1.0)  # fmt: skip
        stop.set()
        assert time.monotonic() - t0 < 3


def test_a_large_frame_before_authentication_is_refused_unread():
    a, b = socket.socketpair()
    with a, b:
        # a header announcing a 16 MiB HELLO, and nothing after it
        a.sendall(p.HEADER.pack(p.MAGIC, 1, p.FrameType.HELLO, 0, p.MAX_DATA, 1, 0, 0))
        with pytest.raises(ProtocolError, match=f"exceeds the maximum {p.MAX_HANDSHAKE_PAYLOAD}"):
            p.handshake(p.FramedConnection(b), info("beta", p.Role.TARGET), SECRET,
                        p.Expect(frozenset({"alpha"})), timeout=5)  # fmt: skip


def test_the_largest_handshake_frames_fit_the_cap():
    hello = p.Hello(p.PROTOCOL_VERSION, p.Role.SOURCE, "r" * 255, "n" * 255, "m" * 255, 1, 4096,
                    p.Generations(5, (1, 2, 3, 4)), b"n" * 32)  # fmt: skip
    assert len(hello.encode()[0]) <= p.MAX_HANDSHAKE_PAYLOAD
    refuse = p.Refuse(p.RefuseReason.POLICY, "x" * 5000)
    assert sum(len(b) for b in refuse.encode()) <= p.MAX_HANDSHAKE_PAYLOAD
