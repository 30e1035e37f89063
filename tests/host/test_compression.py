"""Compression per target (`compression: lz4 | zstd`, docs/protocol.md "Compression").

Three layers: framed connections over a socketpair, authenticated as after a handshake (round
trips of WRITE records and RESYNC_CHUNKs per codec, incompressible data sent as it is, forged
compressed frames refused); the handshake's negotiation (the offer, the answer, a target that
cannot decompress, a peer of protocol version 2, a relay that changes the offer); and live
daemons in this process as in test_metrics.py and test_tls.py: alpha, the primary with an
in-memory ring, replicating to beta, a real target daemon on an image file, with compression
configured, also inside TLS. Traffic only on socketpairs and loopback addresses.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lz4.block
import pytest
import yaml
import zstandard
from repctl import compress as C
from repctl import protocol as P
from repctl.config import load_config
from repctl.daemon import Daemon, SourceResource
from repctl.daemon.metrics import build
from repctl.daemon.state import LinkState
from repctl.errors import (
    AuthError,
    ConnectionClosed,
    HandshakeRefused,
    ProtocolError,
    ReplError,
)
from test_metrics import ALPHA, BETA, CHUNK, SIZE, start_without_device_mapper, until

SECRET = "test-secret-0123456789abcdef"
KEY_S, KEY_T = b"s" * 32, b"t" * 32
CODECS = [C.Codec.LZ4, C.Codec.ZSTD]

WORDS = (b"replication block device target source resync chunk bitmap journal write flush "
         b"the of and a to in is it that for on with as was at by be this from or").split()


def text_like(n: int, seed: int = 1) -> bytes:
    """`n` bytes of words, as a log or a text file: compresses about 3:1."""
    rnd = random.Random(seed)
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(WORDS) + (b"\n" if rnd.random() < 0.1 else b" ")
    return bytes(out[:n])


def half_zero(n: int) -> bytes:
    """Blocks of 4 KiB, each half random, half zero (a sparse database page)."""
    return b"".join(os.urandom(2048) + bytes(2048) for _ in range(n // 4096))


# --------------------------------------------------------------------------------------------
# Framed connections, authenticated as after a handshake
# --------------------------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[Any]:
    """pair(codec): a source and a target connection over a socketpair, keyed, with `codec`."""
    socks: list[socket.socket] = []

    def make(codec: C.Codec, level: int = 0) -> tuple[P.FramedConnection, P.FramedConnection]:
        a, b = socket.socketpair()
        socks.extend((a, b))
        src, tgt = P.FramedConnection(a), P.FramedConnection(b)
        src.authenticate(KEY_S, KEY_T)
        tgt.authenticate(KEY_T, KEY_S)
        src.set_compression(codec, level)
        tgt.set_compression(codec)
        return src, tgt

    yield make
    for s in socks:
        s.close()


def send_forged(conn: P.FramedConnection, frame_type: int, payload: bytes,
                flags: int = P.FLAG_COMPRESSED) -> None:
    """A frame with a valid tag and whatever payload and flags: what a peer that holds the
    session's key (or a bug) could send."""
    with conn._send_lock:
        seq = conn._send_seq + 1
        conn._sendall(P.encode_frame(frame_type, seq, [payload], mac=conn._send_mac, flags=flags))
        conn._send_seq = seq


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.word)
def test_records_and_resync_chunks_round_trip_compressed(pair: Any, codec: C.Codec) -> None:
    src, tgt = pair(codec)
    text, sparse = text_like(64 << 10), half_zero(16 << 10)
    short = text_like(1536, seed=2)  # a device's last chunk may be short
    sent: list[P.Message] = [
        P.write_record(1, 8, text, P.RecordFlags.FUA),
        P.ResyncChunk(7, sparse),
        P.ResyncChunk(9, short),
        P.Record(P.RecordOp.FLUSH, 2),
        P.write_record(3, 0, bytes(1 << 20)),
    ]
    src.send_batch(P.encode(m) for m in sent)
    for want in sent:
        frame = tgt.recv()
        compressed = bool(frame.header.flags & P.FLAG_COMPRESSED)
        assert compressed is (frame.type in (P.FrameType.WRITE, P.FrameType.RESYNC_CHUNK))
        if compressed:
            assert frame.header.length < frame.payload.nbytes  # fewer bytes on the wire
        assert P.decode(frame.type, frame.payload) == want
    raw = len(text) + len(sparse) + len(short) + (1 << 20)
    for stats in (src.compression_stats, tgt.compression_stats):  # both sides count the same
        assert stats.raw_bytes == raw and stats.skipped_bytes == 0
        assert stats.wire_bytes < raw * 0.7
    assert src.compression_stats == tgt.compression_stats


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.word)
def test_incompressible_data_goes_as_it_is(pair: Any, codec: C.Codec) -> None:
    src, tgt = pair(codec)
    noise = os.urandom(64 << 10)
    src.send_message(P.write_record(1, 0, noise))
    src.send_message(P.ResyncChunk(3, noise[:4096]))
    for want in (P.write_record(1, 0, noise), P.ResyncChunk(3, noise[:4096])):
        frame = tgt.recv()
        assert not frame.header.flags & P.FLAG_COMPRESSED
        assert P.decode(frame.type, frame.payload) == want
    n = len(noise) + 4096
    assert src.compression_stats == C.CompressionStats(n, n, n) == tgt.compression_stats


def test_the_skip_threshold_is_seven_eighths() -> None:
    assert C.pays(4096, 3584) and not C.pays(4096, 3585)
    assert not C.pays(512, 512)


def test_without_a_codec_nothing_is_compressed_nor_counted(pair: Any) -> None:
    src, tgt = pair(C.Codec.NONE)
    data = bytes(64 << 10)
    src.send_message(P.write_record(1, 0, data))
    frame = tgt.recv()
    assert frame.header.flags == P.FLAG_MAC and frame.header.length == P.RECORD.size + len(data)
    assert src.compression_stats == C.CompressionStats() == tgt.compression_stats


def zstd_frame(data: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=content_size).compress(data)


def zstd_claiming(size: int) -> bytes:
    """A zstd frame whose header claims `size` bytes of content, with one 4 KiB RLE block."""
    header = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", size)  # 8-byte size
    block = (1 | (1 << 1) | (4096 << 3)).to_bytes(3, "little") + b"\0"  # last, RLE, 4096 x 0
    return header + block


WRITE_HEAD = P.RECORD.pack(1, 0, 4096, P.RecordOp.WRITE, 0)  # a WRITE of 4096 bytes at 0


def chunk_head(size: int, reserved: int = 0) -> bytes:
    return struct.pack("<QII", 0, size, reserved)


FORGED = [
    # (id, codec of the session, frame type, payload, flags, what the receiver says)
    ("garbage zstd", C.Codec.ZSTD, P.FrameType.WRITE, WRITE_HEAD + os.urandom(100),
     P.FLAG_COMPRESSED, "does not decompress"),
    ("garbage lz4", C.Codec.LZ4, P.FrameType.WRITE, WRITE_HEAD + b"\xff" * 100,
     P.FLAG_COMPRESSED, "its lz4 data does not decompress"),
    ("zstd bomb: 16 MiB of zeros said to be 4 KiB", C.Codec.ZSTD, P.FrameType.WRITE,
     WRITE_HEAD + zstd_frame(bytes(16 << 20)), P.FLAG_COMPRESSED,
     "declares 4096 bytes but its zstd frame says 16777216"),
    ("zstd frame that claims 1 TiB", C.Codec.ZSTD, P.FrameType.WRITE,
     WRITE_HEAD + zstd_claiming(1 << 40), P.FLAG_COMPRESSED,
     "declares 4096 bytes but its zstd frame says 1099511627776"),
    ("zstd frame without its size, 64 MiB of zeros", C.Codec.ZSTD, P.FrameType.WRITE,
     WRITE_HEAD + zstd_frame(bytes(64 << 20), content_size=False), P.FLAG_COMPRESSED,
     "its zstd frame says nothing of its size"),
    ("zstd data after the frame", C.Codec.ZSTD, P.FrameType.WRITE,
     WRITE_HEAD + zstd_frame(bytes(4096)) + b"tail", P.FLAG_COMPRESSED, "unused data"),
    ("two zstd frames", C.Codec.ZSTD, P.FrameType.WRITE,
     WRITE_HEAD + zstd_frame(bytes(2048)) + zstd_frame(bytes(2048)), P.FLAG_COMPRESSED,
     "declares 4096 bytes but its zstd frame says 2048"),
    ("lz4 bomb: 16 MiB of zeros said to be 4 KiB", C.Codec.LZ4, P.FrameType.WRITE,
     WRITE_HEAD + lz4.block.compress(bytes(16 << 20), store_size=False), P.FLAG_COMPRESSED,
     "its lz4 data does not decompress"),
    ("lz4 size lie: holds less", C.Codec.LZ4, P.FrameType.WRITE,
     WRITE_HEAD + lz4.block.compress(bytes(2048), store_size=False), P.FLAG_COMPRESSED,
     "declares 4096 bytes but its lz4 data holds 2048"),
    ("a WRITE of 1 GiB", C.Codec.ZSTD, P.FrameType.WRITE,
     P.RECORD.pack(1, 0, 1 << 30, P.RecordOp.WRITE, 0) + zstd_frame(bytes(4096)),
     P.FLAG_COMPRESSED, "declares 1073741824 bytes of data, not 1 to 16777216"),
    ("a resync chunk of 1 GiB", C.Codec.LZ4, P.FrameType.RESYNC_CHUNK,
     chunk_head(1 << 30) + lz4.block.compress(bytes(4096), store_size=False),
     P.FLAG_COMPRESSED, "declares 1073741824 bytes"),
    ("resync chunk with a reserved field", C.Codec.ZSTD, P.FrameType.RESYNC_CHUNK,
     chunk_head(4096, 1) + zstd_frame(bytes(4096)), P.FLAG_COMPRESSED,
     "reserved field 0x1, expected 0"),
    ("resync chunk too short for its size", C.Codec.ZSTD, P.FrameType.RESYNC_CHUNK,
     struct.pack("<Q", 0), P.FLAG_COMPRESSED, "expected at least 16"),
    ("a compressed PING", C.Codec.ZSTD, P.FrameType.PING, bytes(16), P.FLAG_COMPRESSED,
     "only WRITE, RECORDS and RESYNC_CHUNK frames may be compressed"),
    ("compressed without a codec", C.Codec.NONE, P.FrameType.WRITE,
     WRITE_HEAD + zstd_frame(bytes(4096)), P.FLAG_COMPRESSED,
     "this session negotiated no compression"),
    ("another codec's data", C.Codec.LZ4, P.FrameType.WRITE, WRITE_HEAD + zstd_frame(bytes(4096)),
     P.FLAG_COMPRESSED, "compressed frame 1 (WRITE, "),
    ("an unknown header flag", C.Codec.ZSTD, P.FrameType.WRITE, WRITE_HEAD + bytes(4096), 0x4,
     "unknown header flags 0x5"),
]


@pytest.mark.parametrize(("codec", "frame_type", "payload", "flags", "message"),
                         [f[1:] for f in FORGED], ids=[f[0] for f in FORGED])
def test_a_forged_compressed_frame_is_refused(pair: Any, codec: C.Codec, frame_type: int,
                                              payload: bytes, flags: int, message: str) -> None:
    src, tgt = pair(codec)
    send_forged(src, frame_type, payload, flags)
    with pytest.raises(ProtocolError, match=re.escape(message)):
        tgt.recv()
    with pytest.raises(ProtocolError, match="unusable after an earlier error"):
        tgt.recv()  # the stream cannot be trusted any more
    assert tgt.compression_stats == C.CompressionStats()  # nothing taken from it


def test_a_compressed_frame_needs_its_tag(pair: Any) -> None:
    """The tag covers the compressed bytes: changed on the way, it is refused before anything
    is decompressed."""
    src, tgt = pair(C.Codec.ZSTD)
    views = P.encode_frame(P.FrameType.WRITE, 1, [WRITE_HEAD, zstd_frame(bytes(4096))],
                           mac=src._send_mac, flags=P.FLAG_COMPRESSED)
    wire = bytearray(b"".join(bytes(v) for v in views))
    wire[P.HEADER_SIZE + P.RECORD.size + 5] ^= 1
    src.sock.sendall(wire)
    with pytest.raises(ProtocolError, match="bad MAC in frame 1"):
        tgt.recv()


def test_a_hidden_codec_library_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "zstandard", None)  # import fails
    C.reset_imports()
    try:
        assert not C.available(C.Codec.ZSTD)
        assert C.available(C.Codec.LZ4) and C.available(C.Codec.NONE)
        assert not C.available(9)  # a codec of a newer release
        with pytest.raises(ProtocolError, match="the zstandard package is not installed"):
            C.Decompressor(C.Codec.ZSTD, 4096)
    finally:
        monkeypatch.undo()
        C.reset_imports()
    assert C.available(C.Codec.ZSTD)


# --------------------------------------------------------------------------------------------
# The handshake: the source offers, the target answers, both authenticate the two
# --------------------------------------------------------------------------------------------


def info(node: str, role: P.Role, codec: C.Codec = C.Codec.NONE, level: int = 0,
         size: int = 1 << 30) -> P.HandshakeInfo:
    return P.HandshakeInfo("r0", node, role, size, 4096, P.Generations(5, (4,)), codec, level)


def shake(source: P.HandshakeInfo, target: P.HandshakeInfo) -> tuple[Any, Any, Any, Any]:
    """Both sides of a handshake over a socketpair: (source's result, target's result, source's
    connection, target's connection); a result is the PeerInfo or the exception."""
    a, b = socket.socketpair()
    ca, cb = P.FramedConnection(a), P.FramedConnection(b)
    box: dict[str, Any] = {}

    def run(name: str, conn: P.FramedConnection, local: P.HandshakeInfo, peer: str) -> None:
        try:
            box[name] = P.handshake(conn, local, SECRET.encode(), P.Expect(frozenset({peer})),
                                    timeout=5)
        except (OSError, ReplError) as exc:
            box[name] = exc
            conn.close()

    t = threading.Thread(target=run, args=("target", cb, target, "alpha"))
    t.start()
    run("source", ca, source, "beta")
    t.join(10)
    return box["source"], box["target"], ca, cb


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.word)
def test_the_offered_codec_is_the_sessions_on_both_sides(codec: C.Codec) -> None:
    src, tgt, ca, cb = shake(info("alpha", P.Role.SOURCE, codec, 1), info("beta", P.Role.TARGET))
    assert src.compression is codec and tgt.compression is codec
    assert ca.codec is codec and cb.codec is codec
    data = text_like(8192)
    ca.send_message(P.write_record(1, 0, data))
    frame = cb.recv()
    assert frame.header.flags & P.FLAG_COMPRESSED
    assert P.decode(frame.type, frame.payload) == P.write_record(1, 0, data)
    ca.close()
    cb.close()


def test_a_source_that_offers_nothing_streams_plain() -> None:
    src, tgt, ca, cb = shake(info("alpha", P.Role.SOURCE), info("beta", P.Role.TARGET))
    assert src.compression is tgt.compression is ca.codec is cb.codec is C.Codec.NONE
    ca.close()
    cb.close()


def test_a_target_without_the_codec_answers_none_and_the_source_sends_plain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A target that cannot decompress zstd (its library does not import) accepts the
    connection without compression: nothing compressed is ever sent to it. lz4 it still
    takes."""
    real_available, real_hello = P.available, P._Handshake.hello
    sent: list[P.Hello] = []

    def hello(self: Any, peer: str, offer: int = 0) -> Any:
        if self.local.role is P.Role.TARGET:  # only the target lacks zstandard
            monkeypatch.setattr(P, "available",
                                lambda codec: codec != C.Codec.ZSTD and real_available(codec))
        try:
            out = real_hello(self, peer, offer)
        finally:
            monkeypatch.setattr(P, "available", real_available)
        sent.append(out[0])
        return out

    monkeypatch.setattr(P._Handshake, "hello", hello)
    src, tgt, ca, cb = shake(info("alpha", P.Role.SOURCE, C.Codec.LZ4),
                             info("beta", P.Role.TARGET))
    assert src.compression is tgt.compression is C.Codec.LZ4
    ca.close()
    cb.close()
    sent.clear()
    src, tgt, ca, cb = shake(info("alpha", P.Role.SOURCE, C.Codec.ZSTD),
                             info("beta", P.Role.TARGET))
    assert src.compression is tgt.compression is ca.codec is cb.codec is C.Codec.NONE
    assert [(h.role, h.compression) for h in sent] == [
        (P.Role.SOURCE, C.Codec.ZSTD), (P.Role.TARGET, C.Codec.NONE)]
    ca.send_message(P.write_record(1, 0, bytes(8192)))
    frame = cb.recv()
    assert not frame.header.flags & P.FLAG_COMPRESSED
    assert frame.header.length == P.RECORD.size + 8192
    ca.close()
    cb.close()


def test_an_unknown_codec_is_answered_with_none() -> None:
    """A source of a newer release offering a codec this side does not know: none."""
    a, b = socket.socketpair()
    with a, b:
        hs = P._Handshake(P.FramedConnection(b), info("beta", P.Role.TARGET), b"k" * 16,
                          P.Expect(frozenset({"alpha"})))
        for offer, answer in ((9, C.Codec.NONE), (C.Codec.LZ4, C.Codec.LZ4),
                              (C.Codec.NONE, C.Codec.NONE)):
            hello, payload = hs.hello("alpha", offer)
            assert hello.compression is answer
            assert P.Hello.decode(memoryview(payload)).compression is answer
    assert P.Hello.decode(memoryview(P.Hello(3, P.Role.SOURCE, "r0", "a", "b", 1, 4096,
                                             P.Generations(1), bytes(32), 9).encode()[0])
                          ).compression == 9  # kept as a number


def test_a_target_answering_another_codec_is_refused() -> None:
    """The answer must be the offer or none: a target answering zstd to an offer of lz4 is
    refused (it would send frames the source cannot read, or the reverse)."""
    a, b = socket.socketpair()
    ca, cb = P.FramedConnection(a), P.FramedConnection(b)
    with a, b:
        target = P._Handshake(cb, info("beta", P.Role.TARGET), SECRET.encode(),
                              P.Expect(frozenset({"alpha"})))

        def rogue() -> None:
            theirs, theirs_digest = target.receive_hello()
            mine, payload = target.hello(theirs.node, C.Codec.ZSTD)  # whatever was offered
            cb.send(P.FrameType.HELLO, payload)
            proof = P._auth_mac(SECRET.encode(), mine, hashlib.sha256(payload).digest(),
                                theirs, theirs_digest)
            cb.send_message(P.ChallengeResponse(proof))
            while True:
                try:
                    cb.recv()
                except (ConnectionClosed, ProtocolError, OSError):
                    cb.close()
                    return

        t = threading.Thread(target=rogue)
        t.start()
        with pytest.raises(HandshakeRefused) as err:
            P.handshake(ca, info("alpha", P.Role.SOURCE, C.Codec.LZ4), SECRET.encode(),
                        P.Expect(frozenset({"beta"})), timeout=5)
        ca.close()
        t.join(10)
    assert err.value.reason == P.RefuseReason.PROTOCOL
    assert "node 'beta' answered the compression offer lz4 with zstd" in str(err.value)


def test_a_relay_that_changes_the_offer_fails_authentication() -> None:
    """The codecs are HELLO fields, under both sides' HMAC: a man in the middle that strips
    the offer (or forces one) makes the handshake fail on both sides."""
    a, relay_a = socket.socketpair()
    relay_b, b = socket.socketpair()
    ra, rb = P.FramedConnection(relay_a), P.FramedConnection(relay_b)

    def forward(src: P.FramedConnection, dst: P.FramedConnection, strip: bool) -> None:
        try:
            while True:
                frame = src.recv()
                payload = bytes(frame.payload)
                if strip and frame.type is P.FrameType.HELLO:
                    hello = P.Hello.decode(frame.payload)
                    payload = bytes(P.Hello(*[getattr(hello, f) for f in (
                        "protocol_version", "role", "resource", "node", "peer", "device_size",
                        "chunk_size", "generations", "nonce")], C.Codec.NONE).encode()[0])
                    strip = False
                dst.send(frame.type, payload)
        except (ConnectionClosed, ProtocolError, OSError):
            dst.close()

    threads = [threading.Thread(target=forward, args=(ra, rb, True), daemon=True),
               threading.Thread(target=forward, args=(rb, ra, False), daemon=True)]
    for t in threads:
        t.start()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["t"] = P.handshake(P.FramedConnection(b), info("beta", P.Role.TARGET),
                                   SECRET.encode(), P.Expect(frozenset({"alpha"})), timeout=5)
        except (OSError, ReplError) as exc:
            box["t"] = exc

    t = threading.Thread(target=target)
    t.start()
    with pytest.raises(AuthError):
        P.handshake(P.FramedConnection(a), info("alpha", P.Role.SOURCE, C.Codec.ZSTD),
                    SECRET.encode(), P.Expect(frozenset({"beta"})), timeout=5)
    a.close()
    t.join(10)
    b.close()
    assert isinstance(box["t"], AuthError), box["t"]


def test_a_peer_of_protocol_version_2_is_refused_with_the_reason() -> None:
    """A node of the release before compression speaks version 2: its HELLO (without the
    codec) still decodes, and it is refused with VERSION, saying what to do."""
    old = P.Hello(2, P.Role.SOURCE, "r0", "alpha", "beta", 1 << 30, 4096, P.Generations(5),
                  b"\x01" * 32)
    (payload,) = old.encode()
    assert P.Hello.decode(memoryview(payload)) == old  # compression NONE
    assert len(payload) == len(P.Hello(3, *list(vars(old).values())[1:]).encode()[0]) - 4
    a, b = socket.socketpair()
    ca, cb = P.FramedConnection(a), P.FramedConnection(b)
    with a, b:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                P.handshake(cb, info("beta", P.Role.TARGET), SECRET.encode(),
                            P.Expect(frozenset({"alpha"})), timeout=5)
            except (OSError, ReplError) as exc:
                box["t"] = exc

        t = threading.Thread(target=target)
        t.start()
        a.sendall(b"".join(bytes(v) for v in P.encode_frame(P.FrameType.HELLO, 1, [payload],
                                                             version=2)))
        refusal = ca.recv_message()  # REFUSE's layout is every version's
        t.join(10)
    assert isinstance(refusal, P.Refuse) and refusal.reason == P.RefuseReason.VERSION
    assert refusal.text == ("protocol version 2 is not supported (this side speaks 4): run one "
                            "repctl release on every node of the resource")
    assert isinstance(box["t"], HandshakeRefused)


# --------------------------------------------------------------------------------------------
# Live daemons: alpha (an in-memory ring) replicates to beta (an image file)
# --------------------------------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, port: int, target: dict[str, Any], tls: dict[str, Any] | None = None
                 ) -> Path:
    secret = tmp / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    nodes: dict[str, Any] = {
        "alpha": {"address": ALPHA, "device": str(tmp / "data.img"),
                  "metadata": str(tmp / "md.img")},
        "beta": {"address": BETA, "device": str(tmp / "replica.img")}}
    for node, files in (tls or {}).items():
        nodes[node]["tls"] = files.config()
    path = tmp / "repctl.yaml"
    path.write_text(yaml.safe_dump({
        "global": {"control_socket": str(tmp / "s.sock"), "state_dir": str(tmp / "st"),
                   "secret_file": str(secret)},
        "resources": {"r0": {"port": port, "source": "alpha", "chunk_size": CHUNK,
                             "nodes": nodes, "targets": {"beta": target}}},
    }))
    return path


def fill_data(tmp: Path) -> bytes:
    """alpha's device before it comes up: text, zeros, random and half-zero quarters."""
    q = SIZE // 4
    content = text_like(q) + bytes(q) + os.urandom(q) + half_zero(q)
    (tmp / "data.img").write_bytes(content)
    with open(tmp / "replica.img", "wb") as f:
        f.truncate(SIZE)
    return content


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """cluster(target_entry, tls=None): alpha and beta running, alpha's disk filled."""
    monkeypatch.setattr(SourceResource, "start", start_without_device_mapper)
    made: list[Daemon] = []

    def make(target: dict[str, Any], tls: dict[str, Any] | None = None) -> Any:
        fill_data(tmp_path)
        cfg = load_config(write_config(tmp_path, free_port(BETA), target, tls))
        beta, alpha = Daemon(cfg, "beta"), Daemon(cfg, "alpha")
        made.extend((alpha, beta))
        beta.start()
        alpha.start()
        assert not alpha.failed and not beta.failed, (alpha.failed, beta.failed)
        src = alpha.resources["r0"]
        assert isinstance(src, SourceResource)
        link = src.link("beta")
        until(lambda: link.state is LinkState.STREAMING, "beta to stream after its full sync")
        return src, link, src.consumer, beta.resources["r0"], alpha

    yield make
    for d in made:
        d.stop()


def images_equal(tmp: Path) -> bool:
    return (tmp / "replica.img").read_bytes() == (tmp / "data.img").read_bytes()


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_live_replication_compressed_is_byte_exact_and_counted(
        cluster: Any, tmp_path: Path, codec: str) -> None:
    _, link, ring, replica, alpha = cluster({"mode": "sync", "compression": codec})
    # the full sync: 4 MiB in chunks, a quarter of them random (sent as is)
    st = link.status()
    assert st["compression"] == codec and replica.status()["compression"] == codec
    assert st["compression_raw_bytes"] == SIZE == st["resync_bytes"]
    assert SIZE // 4 <= st["compression_skipped_bytes"] < SIZE // 2
    assert st["compression_wire_bytes"] < SIZE * 0.6
    before = dict(st)
    # records: text, then random, then half-zero blocks, each in a RECORDS frame of its own
    # (a frame is compressed as a whole: the random one must not share one)
    noise = os.urandom(32 * CHUNK)
    for sector, data in ((8, text_like(64 * CHUNK, seed=3)), (2048, noise),
                         (4096, half_zero(16 * CHUNK))):
        ring.write(sector, data)
        until(lambda: link.durable >= ring.next_seq - 1, "beta to hold every record durable")
    assert images_equal(tmp_path)
    st = link.status()
    raw = st["compression_raw_bytes"] - before["compression_raw_bytes"]
    wire = st["compression_wire_bytes"] - before["compression_wire_bytes"]
    skipped = st["compression_skipped_bytes"] - before["compression_skipped_bytes"]
    assert (64 + 32 + 16) * CHUNK == st["bytes_sent"] - SIZE
    assert raw == (64 + 32 + 16) * CHUNK + 3 * P.RECORD.size  # the data and the 3 heads
    assert skipped == len(noise) + P.RECORD.size  # the random write went as it is
    assert wire < raw * 0.75
    # the target counted what it received, the same
    r = replica.status()
    assert {k: r[k] for k in ("compression_raw_bytes", "compression_wire_bytes",
                              "compression_skipped_bytes")} == {
        k: st[k] for k in ("compression_raw_bytes", "compression_wire_bytes",
                           "compression_skipped_bytes")}
    # and the metrics say it
    samples = {(s.name, s.labels.get("target")): s.value for m in build(
        alpha.status(), alpha.stats.snapshot()) for s in m.samples}
    assert samples[("repctl_target_compression_raw_bytes_total", "beta")] == st[
        "compression_raw_bytes"]
    assert samples[("repctl_target_compression_wire_bytes_total", "beta")] == st[
        "compression_wire_bytes"]
    assert samples[("repctl_target_compression_skipped_bytes_total", "beta")] == st[
        "compression_skipped_bytes"]


def test_live_without_compression_counts_nothing(cluster: Any, tmp_path: Path) -> None:
    _, link, ring, _, _ = cluster({"mode": "async"})
    ring.write(8, text_like(16 * CHUNK))
    until(lambda: link.ack >= ring.next_seq - 1, "beta to apply the record")
    st = link.status()
    assert st["compression"] == "none"
    assert st["compression_raw_bytes"] == st["compression_wire_bytes"] == 0
    until(lambda: images_equal(tmp_path), "the images to be equal")


def test_live_target_that_declines_gets_everything_uncompressed(
        cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real = P._Handshake.hello

    def declining(self: Any, peer: str, offer: int = 0) -> Any:
        return real(self, peer, 0 if self.local.role is P.Role.TARGET else offer)

    monkeypatch.setattr(P._Handshake, "hello", declining)
    _, link, ring, replica, _ = cluster({"mode": "sync", "compression": "zstd",
                                           "compression_level": 1})
    ring.write(8, text_like(16 * CHUNK))
    until(lambda: link.durable >= ring.next_seq - 1, "beta to hold the record")
    assert images_equal(tmp_path)
    st = link.status()
    assert st["compression"] == "none" and replica.status()["compression"] == "none"
    assert st["compression_raw_bytes"] == 0 and st["bytes_sent"] == SIZE + 16 * CHUNK
    assert "compression zstd is configured, but the target does not accept it" in caplog.text


def test_a_forged_compressed_write_changes_nothing_on_a_live_target(tmp_path: Path) -> None:
    """A peer holding the secret that sends a decompression bomb: the target drops the
    connection before writing anything and says why."""
    fill_data(tmp_path)
    cfg = load_config(write_config(tmp_path, free_port(BETA), {"mode": "sync"}))
    beta = Daemon(cfg, "beta")
    beta.start()
    try:
        replica = beta.resources["r0"]
        with socket.create_connection((BETA, cfg.resource("r0").port), timeout=5) as sock:
            conn = P.FramedConnection(sock)
            peer = P.handshake(conn, info("alpha", P.Role.SOURCE, C.Codec.ZSTD, size=SIZE),
                               SECRET.encode(), P.Expect(frozenset({"beta"})))
            assert peer.compression is C.Codec.ZSTD
            P.receive_out_of_sync(conn, -(-(SIZE // CHUNK) // 8))
            for payload in (WRITE_HEAD + zstd_frame(bytes(16 << 20)),):
                send_forged(conn, P.FrameType.WRITE, payload)
            with pytest.raises((ConnectionClosed, ProtocolError, OSError)):
                while True:
                    conn.recv()
        until(lambda: "does not decompress" in (replica.status()["last_error"] or "")
              or "zstd frame says" in (replica.status()["last_error"] or ""),
              "beta to say why it dropped the connection")
        assert "declares 4096 bytes but its zstd frame says 16777216" in replica.last_error
        assert replica.bytes_received == 0
        assert (tmp_path / "replica.img").read_bytes() == bytes(SIZE)
    finally:
        beta.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the certificates")
def test_live_compression_inside_tls(cluster: Any, tmp_path: Path) -> None:
    from repctl import tls as T
    from tlspki import make_ca, make_node

    pki = tmp_path / "pki"
    make_ca(pki)
    files = {n: make_node(pki, n) for n in ("alpha", "beta")}
    _, link, ring, _, _ = cluster({"mode": "sync", "compression": "lz4"}, files)
    assert isinstance(link.conn.sock, T.TLSSocket)
    ring.write(8, text_like(64 * CHUNK, seed=5))
    until(lambda: link.durable >= ring.next_seq - 1, "beta to hold the record")
    assert images_equal(tmp_path)
    st = link.status()
    assert st["compression"] == "lz4"
    assert st["compression_wire_bytes"] < st["compression_raw_bytes"] * 0.7


def test_status_details_say_what_compression_saved() -> None:
    from repctl import render

    status = {"node": "alpha", "resources": [
        {"name": "r0", "role": "primary", "targets": [
            {"name": "beta", "compression": "zstd", "compression_raw_bytes": 120 << 20,
             "compression_wire_bytes": 30 << 20, "compression_skipped_bytes": 1 << 20},
            {"name": "gamma", "compression": "none", "compression_raw_bytes": 0,
             "compression_wire_bytes": 0, "compression_skipped_bytes": 0},
            {"name": "delta", "compression": None, "compression_raw_bytes": 4 << 20,
             "compression_wire_bytes": 2 << 20, "compression_skipped_bytes": 0}]},
        {"name": "r1", "role": "secondary", "compression": "lz4",
         "compression_raw_bytes": 8192, "compression_wire_bytes": 4096, "targets": []}]}
    lines = render.status_details(status)
    assert ("r0 -> beta: compression zstd: 120.0 MiB as 30.0 MiB (25 %), 1.0 MiB of it sent "
            "as is") in lines
    assert not [line for line in lines if "gamma" in line]  # nothing to say: no codec, no bytes
    assert "r0 -> delta: compression: 4.0 MiB as 2.0 MiB (50 %)" in lines  # not connected now
    assert "r1: compression lz4: 8.0 KiB as 4.0 KiB (50 %)" in lines


def test_live_records_frame_with_one_bad_record_changes_nothing(
        cluster: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A RECORDS frame whose second record ends past the device: the target refuses the frame
    and ends the connection before it applies the first record; the link then reconnects."""
    _, link, ring, _, _ = cluster({"mode": "sync"})
    ring.write(8, text_like(4 * CHUNK))
    until(lambda: link.durable >= ring.next_seq - 1, "beta to hold the record durable")
    conn, seq = link.conn, link.pos
    assert conn is not None
    good = P.write_record(seq, 0, b"\xee" * CHUNK)
    bad = P.write_record(seq + 1, SIZE // P.SECTOR_SIZE - 1, b"\xee" * CHUNK)
    with link.send_lock:
        conn.send_message(P.Records((good, bad)))
    until(lambda: link.conn is not conn, "the target to end the connection")
    assert (tmp_path / "replica.img").read_bytes()[:CHUNK] != b"\xee" * CHUNK
    assert f"record {seq + 1} ends at byte {SIZE + CHUNK - P.SECTOR_SIZE}, past the device" \
        in caplog.text
    until(lambda: link.state is LinkState.STREAMING, "beta to stream again")
    until(lambda: images_equal(tmp_path), "the images to be equal")


def test_live_records_frame_passes_each_record_fua_to_the_store(
        cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target reads each record's own FUA flag in a RECORDS frame (a FUA write is made
    durable before it is acknowledged as durable)."""
    _, link, ring, replica, _ = cluster({"mode": "async"})
    until(lambda: replica.store is not None, "beta's store")
    seen: list[tuple[int, bool]] = []
    apply = type(replica.store).apply

    def spy(self: Any, op: str, sector: int, length: int, data: Any, fua: bool) -> None:
        seen.append((sector, fua))
        apply(self, op, sector, length, data, fua)

    monkeypatch.setattr(type(replica.store), "apply", spy)
    conn, seq = link.conn, link.pos
    assert conn is not None
    with link.send_lock:
        conn.send_message(P.Records((P.write_record(seq, 16, b"f" * CHUNK, P.RecordFlags.FUA),
                                     P.write_record(seq + 1, 24, b"n" * CHUNK))))
    until(lambda: len(seen) == 2, "beta to apply both records")
    assert seen == [(16, True), (24, False)]


def test_live_a_flush_record_goes_without_its_range(cluster: Any, tmp_path: Path) -> None:
    """The kernel's record of an empty flush may hold the bio's sector: on the wire a FLUSH
    has none (protocol.md), or the target refuses the frame and the connection ends. Found by
    the VM tier (`FLUSH record 130 has a sector or a length`), between ext4's writes."""
    _, link, ring, _, _ = cluster({"mode": "sync"})
    conn = link.conn
    ring.write(8, text_like(4 * CHUNK))
    ring.record_op("flush", sector=2048, length=0)
    ring.record_op("noop", sector=16, length=4096)  # a refused discard: sent as a flush
    seq = ring.write(16, text_like(2 * CHUNK, seed=5))
    until(lambda: link.durable >= seq, "beta to hold every record durable")
    assert link.conn is conn, link.last_error  # the same connection: nothing was refused
    assert images_equal(tmp_path)
