"""TLS 1.3 with mutual certificate authentication between the nodes of a resource.

With `tls` configured (docs/config.md), every replication connection runs inside TLS 1.3, both
ways authenticated by certificates signed by the configured CA:

* the connecting side (a source's link, a probe) checks that the listener's certificate is
  issued for the node it meant to reach: the node's **name** in the configuration, which the
  certificate's subjectAltName must carry (DNS, or IP if the node's name is an IP address);
* the listener requires a certificate from the connecting side and, once the handshake inside
  has authenticated the peer's node name, checks that the certificate is issued for it too.

The HMAC handshake of repctl.protocol runs inside TLS unchanged, a second factor (the shared
secret), and so does the per-frame MAC. A node with TLS and one without refuse each other with a
clear error on both sides, never falling back to plain TCP. docs/protocol.md ("TLS") and
docs/wan.md ("TLS between sites") describe the design and how to make the certificates.

`transport(config, resource, node)` gives a resource's transport on this node: `Plain` (no
`tls`) or `TLS`, whose SSL contexts are built there, once, from files checked then (ConfigError
naming the key and the file). Both offer ``client(sock, peer, address)`` and ``server(sock,
address)``, which return the stream that `protocol.FramedConnection` runs on, and
``check_peer(stream, node)``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from repctl import protocol as P
from repctl.config import Config, TLSFiles
from repctl.errors import (
    ConfigError,
    ConnectionClosed,
    HandshakeRefused,
    ProtocolError,
    ReplError,
    TLSError,
)

log = logging.getLogger("repctl.tls")

__all__ = ["NOT_TLS", "TLS", "Plain", "TLSSocket", "Transport", "transport"]

NOT_TLS = "the peer does not speak TLS: configure tls on both nodes"
CA_HINT = "check that both nodes' tls.ca is the CA that signed the peer's cert"
RECV_PIECE = 256 * 1024  # bytes read from the socket at a time
SEND_SLICE = 64 * 1024   # plaintext bytes encrypted and sent at a time (bench/frame_bench.py)

_TLS_HANDSHAKE_RECORD = 0x16  # the first byte a TLS client sends (a handshake record)

# X509_V_ERR_* (openssl/x509_vfy.h): the peer's certificate is not signed by our CA
_OTHER_CA = frozenset({
    2,   # UNABLE_TO_GET_ISSUER_CERT
    7,   # CERT_SIGNATURE_FAILURE
    18,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19,  # SELF_SIGNED_CERT_IN_CHAIN
    20,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
})
_NOT_YET_VALID, _EXPIRED, _INVALID_PURPOSE = 9, 10, 26
_WRONG_HOST = frozenset({62, 64})  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH

# OpenSSL reasons (SSLError.reason) that mean the other end does not speak TLS at all
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING",
                              "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
                              "UNEXPECTED_RECORD", "RECORD_TOO_LARGE", "UNKNOWN_PROTOCOL"})


class TLSSocket:
    """A TLS 1.3 connection over a connected TCP socket, with the socket methods that
    FramedConnection and the daemon use (sendall, recv_into, recv, settimeout, shutdown, ...).

    The source's link sends from one thread while another receives, and OpenSSL's SSL object
    must never be used by two threads at once. So TLS runs over memory buffers (ssl.MemoryBIO)
    under one lock, held only while OpenSSL encrypts or decrypts; the socket's own sends and
    receives happen outside it (the sends in order, under a lock of their own). Made by
    `TLS.client` and `TLS.server` once the TLS handshake has succeeded.
    """

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO, explain: Callable[[ssl.SSLError], str]) -> None:
        self.sock = sock
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._explain = explain
        self._lock = threading.Lock()       # the SSL object and its two buffers
        self._send_lock = threading.Lock()  # the order of the records on the wire
        self._piece = bytearray(RECV_PIECE)
        self._eof = False

    # -- what a socket has
    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    # -- TLS
    def pending(self) -> int:
        """Bytes received and not read yet (a select() on the socket does not see them)."""
        with self._lock:
            return self._obj.pending() + self._in.pending

    def getpeercert(self) -> dict[str, Any]:
        """The peer's certificate, verified by the handshake (ssl.SSLSocket.getpeercert)."""
        cert = self._obj.getpeercert()
        return cert if isinstance(cert, dict) else {}

    def version(self) -> str | None:
        return self._obj.version()

    def sendall(self, data: P.Buffer) -> None:
        view = memoryview(data).cast("B")
        with self._send_lock:
            # in slices: the ciphertext of each stays in the CPU's cache until it is sent
            for start in range(0, view.nbytes, SEND_SLICE):
                with self._lock:
                    try:
                        self._obj.write(view[start:start + SEND_SLICE])
                    except ssl.SSLError as e:
                        raise TLSError(self._explain(e)) from None
                    out = self._out.read()
                self.sock.sendall(out)

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        """Up to `nbytes` bytes of plaintext into `buffer`; 0 at the end of the connection."""
        want = nbytes or memoryview(buffer).nbytes
        while True:
            with self._lock:
                try:
                    return self._obj.read(want, buffer)  # type: ignore[return-value]
                except ssl.SSLWantReadError:
                    if self._eof:
                        return 0  # the connection ended inside a record: the framing says so
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0  # a close (with or without close_notify): the framing decides
                except ssl.SSLError as e:  # an alert, a corrupt record
                    raise TLSError(self._explain(e)) from None
            n = self.sock.recv_into(self._piece)
            with self._lock:
                if n:
                    self._in.write(memoryview(self._piece)[:n])
                else:
                    self._in.write_eof()
                    self._eof = True

    def recv(self, bufsize: int) -> bytes:
        buf = bytearray(bufsize)
        n = self.recv_into(buf)
        return bytes(buf[:n])


class Plain:
    """No TLS: the sockets as they are (`tls` is not configured)."""

    enabled = False

    def client(self, sock: socket.socket, peer: str, address: tuple[str, int]) -> socket.socket:
        return sock

    def server(self, sock: socket.socket, address: tuple[str, int]) -> socket.socket:
        return sock

    def check_peer(self, stream: object, node: str) -> None:
        return None


class TLS:
    """TLS 1.3 with mutual certificate authentication, for one resource on this node: an SSL
    context to connect with and one to accept with, built from `files` (ConfigError naming
    `key` (the config key, ``global.tls``) and the file if one is unreadable, not PEM, or the
    key is not the certificate's, or the certificate is not issued for `node`)."""

    enabled = True

    def __init__(self, files: TLSFiles, node: str, key: str, config_file: str) -> None:
        self.files = files
        self.node = node
        self.key = key
        self.config_file = config_file
        self.not_after: float | None = None  # this node's certificate's end of validity
        self._check_files()
        self.client_ctx = self._context(ssl.PROTOCOL_TLS_CLIENT)
        self.server_ctx = self._context(ssl.PROTOCOL_TLS_SERVER)
        self._check_own_cert()

    # -- building the contexts (at `up`)
    def _error(self, what: str, expected: str, got: str) -> ConfigError:
        return ConfigError(self.config_file, f"{self.key}.{what}", expected, got)

    def _check_files(self) -> None:
        expected = {"cert": "a readable PEM certificate", "key": "a readable PEM private key",
                    "ca": "a readable PEM file of CA certificates"}
        for what, path in (("cert", self.files.cert), ("key", self.files.key),
                           ("ca", self.files.ca)):
            try:
                with open(path, "rb") as f:
                    mode = os.fstat(f.fileno()).st_mode
            except OSError as e:
                raise self._error(what, expected[what], f"{path}: {e.strerror}") from None
            if what == "key" and mode & stat.S_IRWXO:
                raise self._error("key", "a private key that others cannot read (chmod 600 or "
                                  "640)", f"{path} with mode {stat.filemode(mode)}")

    def _context(self, protocol: ssl._SSLMethod) -> ssl.SSLContext:
        files = self.files
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        if protocol is ssl.PROTOCOL_TLS_CLIENT:
            ctx.check_hostname = True
            ctx.hostname_checks_common_name = False  # the subjectAltName only
        else:
            ctx.num_tickets = 0  # no session resumption: nothing comes after the handshake
        try:
            ctx.load_verify_locations(cafile=str(files.ca))
        except (ssl.SSLError, ValueError) as e:
            raise self._error("ca", "a PEM file of CA certificates",
                              f"{files.ca}: {_reason(e)}") from None
        if not ctx.cert_store_stats().get("x509_ca"):
            raise self._error("ca", "a PEM file of CA certificates (basicConstraints CA:TRUE)",
                              f"{files.ca}, which holds no CA certificate")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(files.cert))
        except (ssl.SSLError, ValueError) as e:
            raise self._error("cert", "a PEM certificate", f"{files.cert}: {_reason(e)}") from None
        try:
            ctx.load_cert_chain(str(files.cert), str(files.key), password=_no_password)
        except _EncryptedKey:
            raise self._error("key", "an unencrypted PEM private key",
                              f"{files.key}, encrypted (repctl runs unattended: "
                              "`openssl pkey -in KEY -out KEY.plain`)") from None
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                raise self._error("key", f"the private key of the certificate {files.cert}",
                                  f"{files.key}, the key of another certificate") from None
            got = (f"{files.key}, which holds no PEM private key" if e.reason in (None, "PEM_LIB")
                   else f"{files.key}: {_reason(e)}")
            raise self._error("key", "a PEM private key", got) from None
        return ctx

    def _check_own_cert(self) -> None:
        """The certificate names this node (else every peer refuses it); warn if it expired."""
        info = _decode_cert(self.files.cert)
        if info is None:
            return
        names = _san(info)
        if names and not _names_node(info, self.node):
            raise self._error("cert", f"a certificate issued for node {self.node} (DNS:"
                              f"{self.node} in its subjectAltName, docs/wan.md)",
                              f"{self.files.cert}, issued for {', '.join(names)}")
        if not names:
            raise self._error("cert", f"a certificate issued for node {self.node} (DNS:"
                              f"{self.node} in its subjectAltName, docs/wan.md)",
                              f"{self.files.cert}, which has no subjectAltName")
        with contextlib.suppress(KeyError, ValueError):
            self.not_after = ssl.cert_time_to_seconds(info["notAfter"])
        if self.not_after is not None and self.not_after < time.time():
            log.warning("%s: %s expired on %s: every peer will refuse it, renew it",
                        self.key, self.files.cert, _when(self.not_after))

    # -- connecting
    def client(self, sock: socket.socket, peer: str, address: tuple[str, int]) -> TLSSocket:
        """TLS over the connected `sock` to node `peer` at `address`: the peer's certificate
        must be signed by our CA and name `peer`. TLSError with the reason if not. The
        socket's timeout bounds each wait."""
        where = f"{peer} ({_address(address)})"
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.client_ctx.wrap_bio(incoming, outgoing, server_hostname=peer)
        explain = self._explainer(where, peer, _address(address))
        self._handshake(sock, obj, incoming, outgoing, explain, where, None)
        return TLSSocket(sock, obj, incoming, outgoing, explain)

    def server(self, sock: socket.socket, address: tuple[str, int],
               timeout: float = P.HANDSHAKE_TIMEOUT) -> TLSSocket:
        """TLS over the accepted `sock` from `address`, within `timeout` seconds: the peer must
        present a certificate signed by our CA (its node is checked later, `check_peer`). A peer
        that speaks plain repctl is sent a REFUSE saying why. TLSError with the reason if not."""
        where = f"the peer at {address[0]}"
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.server_ctx.wrap_bio(incoming, outgoing, server_side=True)
        explain = self._explainer(where, None, address[0])
        deadline = time.monotonic() + timeout
        self._handshake(sock, obj, incoming, outgoing, explain, where, deadline)
        sock.settimeout(None)
        return TLSSocket(sock, obj, incoming, outgoing, explain)

    def check_peer(self, stream: object, node: str) -> None:
        """Refuse (HandshakeRefused UNEXPECTED_NODE) a peer authenticated as `node` whose
        certificate is not issued for `node`."""
        if not isinstance(stream, TLSSocket):
            return
        cert = stream.getpeercert()
        if not _names_node(cert, node):
            names = ", ".join(_san(cert)) or "no subjectAltName"
            raise HandshakeRefused(
                P.RefuseReason.UNEXPECTED_NODE,
                f"the TLS certificate of the peer is not issued for node {node} (it names "
                f"{names}): each node needs a certificate for its own name (docs/wan.md)")

    def _handshake(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
                   outgoing: ssl.MemoryBIO, explain: Callable[[ssl.SSLError], str],
                   where: str, deadline: float | None) -> None:
        first = True
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError as e:
                with contextlib.suppress(OSError):
                    sock.sendall(outgoing.read())  # the alert: the peer learns why
                raise TLSError(explain(e)) from None
            out = outgoing.read()
            try:
                if out:
                    sock.sendall(out)
                if done:
                    return
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)
                data = sock.recv(RECV_PIECE)
            except TimeoutError:  # as a plain handshake's: a peer that does not answer
                raise ProtocolError(f"TLS with {where}: the TLS handshake timed out (does the "
                                    "peer speak TLS? configure tls on both nodes)") from None
            except OSError as e:
                raise TLSError(f"TLS with {where}: {NOT_TLS} (the connection ended in the TLS "
                               f"handshake: {e.strerror or e})") from None
            if not data:
                if first and obj.server_side:  # a port probe: connected and closed, as in plain
                    raise ConnectionClosed("the peer closed the connection before the TLS "
                                           "handshake")
                raise TLSError(f"TLS with {where}: {NOT_TLS} (it closed the connection in the "
                               "TLS handshake)")
            if first and obj.server_side and data[0] != _TLS_HANDSHAKE_RECORD:
                self._refuse_plain(sock, data, where)
            first = False
            incoming.write(data)

    def _refuse_plain(self, sock: socket.socket, data: bytes, where: str) -> NoReturn:
        """A peer that speaks plain repctl (or anything but TLS) to this TLS listener: tell a
        repctl peer why in a REFUSE it can read, then give up."""
        if data[:1] == b"R":  # the frame magic, b"RPL1": a repctl node without tls
            conn = P.FramedConnection(sock)
            with contextlib.suppress(OSError, ReplError):
                conn.send_message(P.Refuse(
                    P.RefuseReason.POLICY,
                    f"node {self.node} accepts TLS connections only and this node has no tls "
                    "configured: configure tls on both nodes"))
            conn.linger()
            raise TLSError(f"TLS with {where}: {NOT_TLS} (it sent plain repctl frames)")
        raise TLSError(f"TLS with {where}: {NOT_TLS} (it sent {bytes(data[:4])!r})")

    # -- errors
    def _explainer(self, where: str, peer: str | None,
                   address: str) -> Callable[[ssl.SSLError], str]:
        return lambda e: self.explain(e, where, peer, address)

    def explain(self, e: ssl.SSLError, where: str, peer: str | None, address: str) -> str:
        """What a TLS failure with `where` (node `peer` at `address` when this side connected)
        means, and what to check: the verification's own error, or the alert the peer sent."""
        if isinstance(e, ssl.SSLCertVerificationError):
            code, message = e.verify_code, e.verify_message
            if code in _OTHER_CA:
                return (f"certificate verify failed: {message}: the certificate of {where} is "
                        f"not signed by the CA in {self.key}.ca ({self.files.ca}): {CA_HINT}")
            if code == _EXPIRED:
                return (f"certificate verify failed: the certificate of {where} has expired "
                        f"(it is past its notAfter; now is {_when(time.time())}): renew it")
            if code == _NOT_YET_VALID:
                return (f"certificate verify failed: the certificate of {where} is not valid "
                        f"yet (now is {_when(time.time())}): check both nodes' clocks")
            if code in _WRONG_HOST:
                return (f"certificate verify failed: the certificate presented at {address} is "
                        f"not issued for node {peer} ({message}): is {address} the address of "
                        f"{peer}? A node's certificate must carry its name in its subjectAltName "
                        f"(DNS:{peer})")
            if code == _INVALID_PURPOSE:
                return (f"certificate verify failed: the certificate of {where} is not for "
                        f"this use ({message}): its extendedKeyUsage must allow serverAuth and "
                        "clientAuth (docs/wan.md)")
            return f"certificate verify failed: {message} (the certificate of {where})"
        reason = e.reason or ""
        mine = f"this node's certificate {self.files.cert}"
        if reason == "TLSV1_ALERT_UNKNOWN_CA":
            return (f"{where} refused {mine}: it is not signed by the peer's CA: {CA_HINT}")
        if reason == "SSLV3_ALERT_CERTIFICATE_EXPIRED":
            if self.not_after is None:
                return f"{where} refused {mine} as expired: renew it"
            if self.not_after < time.time():
                return (f"{where} refused {mine} as expired (it expired on "
                        f"{_when(self.not_after)}): renew it")
            return (f"{where} refused {mine} as expired, though it is valid until "
                    f"{_when(self.not_after)} by this node's clock: check both nodes' clocks")
        if reason in ("SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
                      "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return (f"{where} refused {mine} ({e.reason}): is it issued for node {self.node} "
                    f"by the CA in the peer's tls.ca? The peer's log says why")
        if reason in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL",
                      "NO_PROTOCOLS_AVAILABLE"):
            return f"TLS with {where}: the peer does not speak TLS 1.3 ({e.reason})"
        if reason in _NOT_TLS_REASONS or isinstance(e, ssl.SSLEOFError):
            return f"TLS with {where}: {NOT_TLS} ({e.reason or e})"
        return f"TLS with {where}: {e.reason or e}"


Transport = Plain | TLS


def transport(config: Config, resource: str, node: str) -> Transport:
    """The transport of `resource` on `node` (this node): TLS if the node has `tls` (its own or
    the global one), else plain TCP. ConfigError, naming the key and the file, if its TLS files
    cannot serve (unreadable, not PEM, a key not the certificate's, a certificate not issued
    for `node`)."""
    res = config.resource(resource)
    files = res.nodes[node].tls
    if files is None:
        return Plain()
    own = files != config.global_.tls
    key = f"resources.{resource}.nodes.{node}.tls" if own else "global.tls"
    return TLS(files, node, key, config.file)


# --------------------------------------------------------------------------------------------


class _EncryptedKey(Exception):
    pass


def _no_password() -> NoReturn:
    raise _EncryptedKey


def _reason(e: Exception) -> str:
    """OpenSSL's reason for `e`, in words (``no certificate or crl found``)."""
    reason = getattr(e, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(e))


def _address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _decode_cert(path: Path) -> dict[str, Any] | None:
    """The certificate at `path` as ssl.SSLSocket.getpeercert() gives one, or None. Uses
    CPython's own decoder (ssl._ssl._test_decode_cert, in every CPython 3): there is no public
    one; without it the checks that use it are skipped."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        info = decode(str(path))
    except (OSError, ssl.SSLError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _san(cert: dict[str, Any]) -> list[str]:
    return [f"{kind}:{value}".replace("IP Address:", "IP:").strip()
            for kind, value in cert.get("subjectAltName", ())]


def _names_node(cert: dict[str, Any], node: str) -> bool:
    """Whether the certificate's subjectAltName carries `node`: a DNS name (exactly, or by a
    wildcard for its first label), or an IP address if `node` is one. No fallback to the
    common name, as on the connecting side."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(node)
    except ValueError:
        ip = None
    name = node.lower().rstrip(".")
    for kind, value in cert.get("subjectAltName", ()):
        if ip is not None and kind == "IP Address":
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(value.strip()) == ip:
                    return True
        elif ip is None and kind == "DNS":
            pattern = value.lower().rstrip(".")
            if pattern == name:
                return True
            if (pattern.startswith("*.") and pattern.count(".") >= 2 and "." in name
                    and name.split(".", 1)[1] == pattern[2:]):
                return True
    return False
