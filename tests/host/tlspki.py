"""Throwaway certificates for the TLS tests and bench/frame_bench.py, made with the `openssl`
command line as docs/wan.md ("TLS between sites") tells an administrator to: a CA, and per node a
key and a certificate whose subjectAltName carries the node's name."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeFiles:
    cert: Path
    key: Path
    ca: Path

    def config(self) -> dict[str, str]:
        """The `tls` mapping of the configuration file."""
        return {"cert": str(self.cert), "key": str(self.key), "ca": str(self.ca)}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str = "ca") -> Path:
    """A self-signed CA, `folder/NAME.crt` with its key `folder/NAME.key`."""
    folder.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "30",
             "-subj", f"/CN=repctl test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)
    return folder / f"{name}.crt"


def make_node(folder: Path, node: str, *, ca: str = "ca", san: str | None = None,
              days: int = 30, file: str | None = None) -> NodeFiles:
    """A key and a certificate for `node` signed by CA `ca` of `folder`: subjectAltName
    DNS:NODE (or `san`), valid `days` days from now (negative: expired that long ago)."""
    file = file or node
    (folder / f"{file}.ext").write_text(
        f"subjectAltName={san or f'DNS:{node}'}\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "keyUsage=critical,digitalSignature\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{file}.key", "-out", f"{file}.csr", "-subj", f"/CN={node}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{file}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{file}.crt", "-days", str(days),
             "-extfile", f"{file}.ext", cwd=folder)
    (folder / f"{file}.key").chmod(0o600)
    return NodeFiles(folder / f"{file}.crt", folder / f"{file}.key", folder / f"{ca}.crt")
