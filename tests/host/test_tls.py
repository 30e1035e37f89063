"""TLS 1.3 with mutual certificate authentication between the nodes (repctl.tls, docs/wan.md).

Live daemons in this process, as in test_metrics.py: beta (or gamma), a real `Daemon` whose
target resource writes into an image file, and alpha, the primary, a real `Daemon` and
`SourceResource` whose kernel consumer is an in-memory ring. Each node has a configuration file
of its own (they differ where a test makes them: another CA, TLS on one side only, another
secret). The certificates are made for each test run with the `openssl` command line, as
docs/wan.md says. Traffic only on loopback addresses.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from repctl import protocol as P
from repctl import tls as T
from repctl.config import Config, TLSFiles, load_config
from repctl.daemon import Daemon, SourceResource
from repctl.daemon.failover import ProbeKind, probe
from repctl.daemon.state import LinkState
from repctl.errors import ConfigError, HandshakeRefused, TLSError
from test_metrics import ALPHA, BETA, CHUNK, SIZE, start_without_device_mapper, until
from tlspki import NodeFiles, make_ca, make_node

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command makes the test certificates")

SECRET = "test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A CA and the nodes' certificates; another CA; an expired certificate."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d)
    make_ca(d, "other")
    both_cas = d / "both-cas.crt"
    both_cas.write_text((d / "ca.crt").read_text() + (d / "other.crt").read_text())
    alpha_other = make_node(d, "alpha", ca="other", file="alpha-other")
    return SimpleNamespace(
        dir=d,
        alpha=make_node(d, "alpha"),
        # signed by the other CA, and trusting both: it accepts beta, beta refuses it
        alpha_other_ca=NodeFiles(alpha_other.cert, alpha_other.key, both_cas),
        beta=make_node(d, "beta"),
        gamma=make_node(d, "gamma"),
        beta_other_ca=make_node(d, "beta", ca="other", file="beta-other"),
        beta_expired=make_node(d, "beta", days=-1, file="beta-expired"),
    )


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, me: str, port: int, tls: dict[str, NodeFiles | None], *,
                 target: str = "beta", secret: str = SECRET) -> Config:
    """The configuration file of node `me`: alpha the source at ALPHA, `target` at BETA, each
    node with the `tls` given for it (None: none)."""
    for name in ("data.img", "replica.img"):
        path = tmp / name
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(SIZE)
    secret_file = tmp / f"secret-{me}"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    nodes: dict[str, Any] = {
        "alpha": {"address": ALPHA, "device": str(tmp / "data.img"),
                  "metadata": str(tmp / "md.img")},
        target: {"address": BETA, "device": str(tmp / "replica.img")},
    }
    for node, files in tls.items():
        if files is not None:
            nodes[node]["tls"] = files.config()
    path = tmp / f"{me}.yaml"
    path.write_text(yaml.safe_dump({
        "global": {"control_socket": str(tmp / f"{me}.sock"), "state_dir": str(tmp / f"st-{me}"),
                   "secret_file": str(secret_file)},
        "resources": {"r0": {"port": port, "source": "alpha", "chunk_size": CHUNK,
                             "nodes": nodes, "targets": {target: {"mode": "sync"}}}},
    }))
    return load_config(path)


class Cluster:
    """alpha (primary) and its target, each a live daemon with its own configuration."""

    def __init__(self, tmp: Path, alpha: Config, target: Config, target_name: str = "beta"):
        self.tmp = tmp
        self.target = Daemon(target, target_name)
        self.alpha = Daemon(alpha, "alpha")
        self.target.start()
        self.alpha.start()
        assert not self.alpha.failed and not self.target.failed, (self.alpha.failed,
                                                                   self.target.failed)
        self.src = self.alpha.resources["r0"]
        assert isinstance(self.src, SourceResource)
        self.ring = self.src.consumer
        self.link = self.src.link("beta")  # alpha's file: beta is its target, at BETA
        self.replica = self.target.resources["r0"]

    def stop(self) -> None:
        self.alpha.stop()
        self.target.stop()

    def link_error(self) -> str:
        return str(self.link.status()["last_error"] or "")

    def target_error(self) -> str:
        return str(self.replica.status()["last_error"] or "")

    def nothing_written(self) -> bool:
        return (self.replica.bytes_received == 0
                and (self.tmp / "replica.img").read_bytes() == bytes(SIZE))


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """cluster(alpha_file, target_file, ...): a Cluster whose nodes have the TLS files given
    for each node, in alpha's configuration file and in the target's (they may differ)."""
    monkeypatch.setattr(SourceResource, "start", start_without_device_mapper)
    made: list[Cluster] = []
    port = free_port(BETA)

    def make(alpha_file: dict[str, NodeFiles | None], target_file: dict[str, NodeFiles | None],
             *, target: str = "beta", target_secret: str = SECRET) -> Cluster:
        a = write_config(tmp_path, "alpha", port, alpha_file)
        t = write_config(tmp_path, target, port, target_file, target=target,
                         secret=target_secret)
        c = Cluster(tmp_path, a, t, target)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def both(pki: SimpleNamespace, **over: NodeFiles | None) -> dict[str, NodeFiles | None]:
    return {"alpha": pki.alpha, "beta": pki.beta, **over}


def test_replication_over_tls_is_tls_1_3_and_byte_exact(cluster: Any,
                                                        pki: SimpleNamespace) -> None:
    c = cluster(both(pki), both(pki))
    until(lambda: c.link.state is LinkState.STREAMING, "beta to stream after its full sync")
    for i in range(40):
        c.ring.write(i * 8 * 3, bytes([i + 1]) * CHUNK * (1 + i % 3))
    until(lambda: c.link.durable >= c.ring.next_seq - 1, "beta to hold every record durable")
    assert (c.tmp / "replica.img").read_bytes() == (c.tmp / "data.img").read_bytes()
    # both ends of the session run TLS 1.3, the source's and the target's
    assert c.link.conn is not None and isinstance(c.link.conn.sock, T.TLSSocket)
    assert c.link.conn.sock.version() == "TLSv1.3"
    target_conn = c.replica.conn
    assert target_conn is not None and isinstance(target_conn.sock, T.TLSSocket)
    assert target_conn.sock.getpeercert()["subjectAltName"] == (("DNS", "alpha"),)
    assert c.link.last_error is None and c.replica.last_error is None


def test_a_certificate_of_another_ca_is_refused_and_nothing_is_written(
        cluster: Any, pki: SimpleNamespace) -> None:
    c = cluster(both(pki), both(pki, beta=pki.beta_other_ca))
    until(lambda: "certificate verify failed" in c.link_error(), "alpha to refuse beta's cert")
    err = c.link_error()
    assert f"the certificate of beta ({BETA}:" in err
    assert "is not signed by the CA in resources.r0.nodes.alpha.tls.ca" in err
    assert "check that both nodes' tls.ca is the CA that signed the peer's cert" in err
    until(lambda: "refused this node's certificate" in c.target_error(), "beta to say why")
    assert "it is not signed by the peer's CA" in c.target_error()
    assert c.link.state is LinkState.CONNECTING and c.link.conn is None
    assert c.nothing_written()
    assert c.target.stats.refusals.get(("r0", "tls", "local"), 0) >= 1  # the metrics' count


def test_a_port_probe_of_a_tls_listener_is_no_tls_failure(cluster: Any,
                                                          pki: SimpleNamespace) -> None:
    """A monitor that only connects and closes is not a peer without TLS: not counted, and
    said as in plain TCP."""
    c = cluster(both(pki), both(pki))
    until(lambda: c.link.state is LinkState.STREAMING, "beta to stream")
    with socket.create_connection((ALPHA, c.src.cfg.port), timeout=5):
        pass  # alpha's listener, the primary's
    with socket.create_connection((BETA, c.src.cfg.port), timeout=5):
        pass  # beta's, busy with alpha: the probe still gets a TLS handshake of its own
    until(lambda: "before the TLS handshake" in c.target_error(), "beta to see the probe end")
    assert not [k for k in c.target.stats.refusals if k[1] == "tls"]
    assert not [k for k in c.alpha.stats.refusals if k[1] == "tls"]
    assert c.link.state is LinkState.STREAMING


def test_a_source_certificate_of_another_ca_is_refused_after_its_own_handshake(
        cluster: Any, pki: SimpleNamespace) -> None:
    """TLS 1.3: the connecting side finishes its handshake before the listener has checked its
    certificate; the refusal arrives as an alert at its first read, inside the HMAC handshake,
    and still reads as TLS's, not as a lost connection."""
    c = cluster(both(pki, alpha=pki.alpha_other_ca), both(pki, alpha=pki.alpha_other_ca))
    until(lambda: "refused this node's certificate" in c.link_error(), "beta to refuse alpha")
    assert (f"beta ({BETA}:{c.src.cfg.port}) refused this node's certificate "
            f"{pki.alpha_other_ca.cert}: it is not signed by the peer's CA: check that both "
            "nodes' tls.ca is the CA that signed the peer's cert") in c.link_error()
    until(lambda: "certificate verify failed" in c.target_error(), "beta to say why")
    assert ("the certificate of the peer at 127.0.0.1 is not signed by the CA in "
            "resources.r0.nodes.beta.tls.ca") in c.target_error()
    assert c.nothing_written()


def test_an_expired_certificate_is_refused_saying_since_when(cluster: Any,
                                                            pki: SimpleNamespace) -> None:
    c = cluster(both(pki), both(pki, beta=pki.beta_expired))
    until(lambda: "expired" in c.link_error(), "alpha to refuse beta's expired cert")
    assert "certificate verify failed: the certificate of beta" in c.link_error()
    assert "has expired" in c.link_error()
    # the node whose certificate it is says since when
    until(lambda: "as expired" in c.target_error(), "beta to say its cert expired")
    assert f"this node's certificate {pki.beta_expired.cert} as expired (it expired on " in (
        c.target_error())
    assert c.nothing_written()


def test_a_certificate_for_another_node_is_refused(cluster: Any, pki: SimpleNamespace) -> None:
    """alpha's file says beta is at BETA; what answers there is gamma, with its own (valid)
    certificate: alpha refuses it, as not beta's."""
    c = cluster(both(pki), {"alpha": pki.alpha, "gamma": pki.gamma}, target="gamma")
    until(lambda: "not issued for node beta" in c.link_error(), "alpha to refuse gamma")
    assert f"the certificate presented at {BETA}:" in c.link_error()
    assert "(DNS:beta)" in c.link_error()
    assert c.nothing_written()


def test_a_listener_refuses_a_certificate_not_of_the_node_that_authenticated(
        cluster: Any, pki: SimpleNamespace) -> None:
    """A peer with a valid certificate (gamma's) that authenticates as alpha (it holds the
    secret) is refused: the certificate must name the node the handshake authenticated."""
    c = cluster(both(pki), both(pki))
    until(lambda: c.link.state is LinkState.STREAMING, "beta to stream")
    c.alpha.stop()  # the target is free for another source
    until(lambda: c.replica.conn is None, "beta to see alpha go")
    gamma = T.TLS(TLSFiles(pki.gamma.cert, pki.gamma.key, pki.gamma.ca), "gamma", "global.tls",
                  "<test>")
    port = c.src.cfg.port
    sock = socket.create_connection((BETA, port), timeout=5)
    conn = P.FramedConnection(gamma.client(sock, "beta", (BETA, port)))
    local = P.HandshakeInfo("r0", "alpha", P.Role.SOURCE, SIZE, CHUNK, P.Generations(7))
    with pytest.raises(HandshakeRefused) as refused:
        P.handshake(conn, local, SECRET.encode(), P.Expect(frozenset({"beta"})), timeout=5)
    conn.close()
    assert refused.value.remote and refused.value.reason == P.RefuseReason.UNEXPECTED_NODE
    assert "the TLS certificate of the peer is not issued for node alpha (it names DNS:gamma)" in (
        refused.value.text)


def test_tls_on_the_source_only_is_refused_on_both_sides(cluster: Any,
                                                         pki: SimpleNamespace) -> None:
    c = cluster(both(pki), {"alpha": None, "beta": None})
    until(lambda: T.NOT_TLS in c.link_error(), "alpha to find beta without TLS")
    until(lambda: "has no tls configured: configure tls on both nodes" in c.target_error(),
          "beta to find alpha with TLS")
    assert "the peer speaks TLS" in c.target_error()
    assert c.nothing_written()


def test_tls_on_the_target_only_is_refused_on_both_sides(cluster: Any,
                                                         pki: SimpleNamespace) -> None:
    c = cluster({"alpha": None, "beta": None}, both(pki))
    until(lambda: "configure tls on both nodes" in c.link_error(), "alpha to learn why")
    assert "node beta accepts TLS connections only and this node has no tls configured" in (
        c.link_error())
    until(lambda: T.NOT_TLS in c.target_error(), "beta to find alpha without TLS")
    assert "it sent plain repctl frames" in c.target_error()
    assert c.nothing_written()


def test_the_shared_secret_is_still_checked_inside_tls(cluster: Any,
                                                       pki: SimpleNamespace) -> None:
    c = cluster(both(pki), both(pki), target_secret="another-secret-0123456789abcdef")
    until(lambda: "AUTH_FAILED" in c.link_error(), "the HMAC to refuse the other secret")
    assert "the shared secrets differ" in c.link_error()
    assert c.link.refusal is not None and c.link.refusal.reason == P.RefuseReason.AUTH_FAILED
    assert c.nothing_written()


def test_probes_and_the_primarys_listener_speak_tls(cluster: Any, pki: SimpleNamespace) -> None:
    c = cluster(both(pki), both(pki))
    until(lambda: c.link.state is LinkState.STREAMING, "beta to stream")
    cfg = c.src.cfg
    local = P.HandshakeInfo("r0", "beta", P.Role.SOURCE, SIZE, CHUNK, P.Generations(7))
    beta_tls = T.transport(c.target.config, "r0", "beta")
    found = probe(cfg, "beta", "alpha", SECRET.encode(), local, beta_tls)
    assert found.kind is ProbeKind.PRIMARY, found  # the primary's listener, over TLS
    plain = probe(cfg, "beta", "alpha", SECRET.encode(), local, T.Plain())
    assert plain.kind is ProbeKind.REFUSED and "configure tls on both nodes" in plain.text
    other = T.TLS(TLSFiles(pki.beta_other_ca.cert, pki.beta_other_ca.key, pki.dir / "other.crt"),
                  "beta", "global.tls", "<test>")
    refused = probe(cfg, "beta", "alpha", SECRET.encode(), local, other)
    assert refused.kind is ProbeKind.REFUSED and "certificate verify failed" in refused.text
    assert c.link.state is LinkState.STREAMING  # none of it touched the session


def test_a_peer_that_never_answers_the_tls_handshake_is_unreachable_not_refused(
        tmp_path: Path, pki: SimpleNamespace) -> None:
    """As with plain TCP: a probe that gets no answer (a hung daemon, its port still open)
    takes the peer as unreachable, which fencing may then deal with."""
    config = write_config(tmp_path, "alpha", free_port(BETA), both(pki))
    local = P.HandshakeInfo("r0", "alpha", P.Role.SOURCE, SIZE, CHUNK, P.Generations(7))
    with socket.create_server((BETA, config.resource("r0").port)):  # listens, never accepts
        found = probe(config.resource("r0"), "alpha", "beta", SECRET.encode(), local,
                      T.transport(config, "r0", "alpha"), timeout=0.5)
    assert found.kind is ProbeKind.UNREACHABLE, found
    assert "the TLS handshake timed out" in found.text


# ------------------------------------------------------------------ bad files: refused at up


def _encrypted(pki: SimpleNamespace) -> Path:
    out = pki.dir / "beta-encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.beta.key), "-aes256", "-passout",
                    "pass:secret", "-out", str(out)], check=True, capture_output=True)
    out.chmod(0o600)
    return out


def _not_a_key(pki: SimpleNamespace) -> Path:
    out = pki.dir / "beta-cert-as.key"
    shutil.copy(pki.beta.cert, out)
    out.chmod(0o600)
    return out


def _world_readable(pki: SimpleNamespace) -> Path:
    out = pki.dir / "beta-open.key"
    shutil.copy(pki.beta.key, out)
    out.chmod(0o644)
    return out


BAD_FILES = [
    ("missing cert", lambda p: {"cert": p.dir / "nope.crt"},
     "global.tls.cert: expected a readable PEM certificate, got {dir}/nope.crt: No such file"),
    ("another node's key", lambda p: {"key": p.alpha.key},
     ("global.tls.key: expected the private key of the certificate {dir}/beta.crt, got "
      "{dir}/alpha.key, the key of another certificate")),
    ("a key others can read", lambda p: {"key": _world_readable(p)},
     "global.tls.key: expected a private key that others cannot read"),
    ("an encrypted key", lambda p: {"key": _encrypted(p)},
     ("global.tls.key: expected an unencrypted PEM private key, got {dir}/beta-encrypted.key, "
      "encrypted")),
    ("a key that is no key", lambda p: {"key": _not_a_key(p)},
     ("global.tls.key: expected a PEM private key, got {dir}/beta-cert-as.key, which holds no "
      "PEM private key")),
    ("a CA file without a CA", lambda p: {"ca": p.beta.cert},
     ("global.tls.ca: expected a PEM file of CA certificates (basicConstraints CA:TRUE), got "
      "{dir}/beta.crt, which holds no CA certificate")),
    ("a cert that is no cert", lambda p: {"cert": p.beta.key},
     "global.tls.cert: expected a PEM certificate, got {dir}/beta.key"),
    ("a cert for another node", lambda p: {"cert": p.gamma.cert, "key": p.gamma.key},
     ("global.tls.cert: expected a certificate issued for node beta (DNS:beta in its "
      "subjectAltName, docs/wan.md), got {dir}/gamma.crt, issued for DNS:gamma")),
]


@pytest.mark.parametrize(("change", "message"), [(b[1], b[2]) for b in BAD_FILES],
                         ids=[b[0] for b in BAD_FILES])
def test_bad_tls_files_are_a_clear_error_at_up_that_changes_nothing(
        tmp_path: Path, pki: SimpleNamespace, change: Any, message: str) -> None:
    files = {**pki.beta.config(), **{k: str(v) for k, v in change(pki).items()}}
    path = tmp_path / "beta.yaml"
    write_config(tmp_path, "beta", free_port(BETA), {})
    data = yaml.safe_load(path.read_text())
    data["global"]["tls"] = files  # global this time: every node of the file has it
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    daemon = Daemon(config, "beta")
    with pytest.raises(ConfigError) as e:
        daemon.up("r0")
    assert str(e.value).startswith(f"{path}: ")
    assert message.format(dir=pki.dir) in str(e.value)
    assert "r0" not in daemon.resources
    with pytest.raises(ConnectionRefusedError):  # it never listened
        socket.create_connection((BETA, config.resource("r0").port), timeout=2).close()
    daemon.start()  # `repctl daemon`: the resource stays down, with the reason
    assert message.format(dir=pki.dir) in daemon.failed["r0"]
    daemon.stop()
    assert (tmp_path / "replica.img").read_bytes() == bytes(SIZE)


def test_a_configuration_with_tls_on_some_nodes_only_is_refused(tmp_path: Path,
                                                                pki: SimpleNamespace) -> None:
    with pytest.raises(ConfigError, match=r"resources\.r0\.nodes\.beta\.tls: expected tls on "
                                          r"every node of r0 or on none \(alpha has it"):
        write_config(tmp_path, "alpha", free_port(BETA), {"alpha": pki.alpha, "beta": None})


# ------------------------------------------------------------------ the framing over TLS


def _tls_pair(pki: SimpleNamespace) -> tuple[T.TLSSocket, T.TLSSocket]:
    a = T.TLS(TLSFiles(pki.alpha.cert, pki.alpha.key, pki.alpha.ca), "alpha", "k", "f")
    b = T.TLS(TLSFiles(pki.beta.cert, pki.beta.key, pki.beta.ca), "beta", "k", "f")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[T.TLSSocket] = []
    t = threading.Thread(target=lambda: accepted.append(b.server(listener.accept()[0],
                                                                 ("127.0.0.1", 0))))
    t.start()
    client = a.client(socket.create_connection(("127.0.0.1", port), timeout=5), "beta",
                      ("127.0.0.1", port))
    t.join()
    listener.close()
    return client, accepted[0]


def test_frames_cross_tls_in_both_directions_at_once(pki: SimpleNamespace) -> None:
    """The link's pattern: one thread sends batches while another receives on the same TLS
    connection; frames of every size arrive whole and in order, MAC on."""
    left, right = _tls_pair(pki)
    a, b = P.FramedConnection(left), P.FramedConnection(right)
    a.authenticate(b"s" * 32, b"t" * 32)
    b.authenticate(b"t" * 32, b"s" * 32)
    sizes = [512, 4096, 70_144, 1 << 20, 512 * 3]  # 70_144: past _DIRECT, 137 sectors
    sent = [bytes([i % 251]) * sizes[i % len(sizes)] for i in range(300)]
    got: list[bytes] = []
    pongs: list[int] = []

    def target() -> None:  # applies and answers, as a target does, on one thread
        for _ in sent:
            msg = b.recv_message()
            assert isinstance(msg, P.Record)
            got.append(bytes(msg.data))
            b.send_message(P.Ack(msg.ring_seq))
        b.send_message(P.Pong(1, 2))

    def receiver() -> None:  # the source's receiver thread
        while True:
            msg = a.recv_message()
            if isinstance(msg, P.Pong):
                return
            assert isinstance(msg, P.Ack)
            pongs.append(msg.ring_seq)

    threads = [threading.Thread(target=target), threading.Thread(target=receiver)]
    for t in threads:
        t.start()
    for first in range(0, len(sent), 37):  # the sender: batches, as Link._send_records
        batch = [P.write_record(seq + 1, 0, sent[seq]) for seq in range(first, min(first + 37,
                                                                                  len(sent)))]
        a.send_batch([(r.frame_type, r.encode()) for r in batch])
    for t in threads:
        t.join(30)
    assert got == sent
    assert pongs == list(range(1, len(sent) + 1))
    a.close()
    b.close()


def test_a_closed_tls_connection_reads_as_closed(pki: SimpleNamespace) -> None:
    left, right = _tls_pair(pki)
    a, b = P.FramedConnection(left), P.FramedConnection(right)
    a.send_message(P.Ping(1, 2))
    a.close()
    assert b.recv_message() == P.Ping(1, 2)
    with pytest.raises(P.ConnectionClosed):
        b.recv_message()
    b.close()


def test_tls_socket_errors_are_tls_errors(pki: SimpleNamespace) -> None:
    """A corrupt record is TLS's error (a ReplError the daemon reports), not a crash."""
    left, right = _tls_pair(pki)
    left.sock.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))  # an application record, forged
    with pytest.raises(TLSError, match="TLS with the peer at 127.0.0.1"):
        right.recv(100)
    left.close()
    right.close()
    assert isinstance(TLSError("x"), Exception) and not isinstance(TLSError("x"), ssl.SSLError)
