"""Domain errors of repctl.

Every error that a user or a peer can cause is a `ReplError`, so the CLI and the daemon catch one
base class at their edge and turn it into a message and an exit status (or a status line), never a
traceback.

    ReplError
     +-- ConfigError          the configuration file is wrong; nothing was started
     +-- ProtocolError        the peer's bytes or frame order are malformed: drop the connection
     |    +-- ConnectionClosed    the peer closed the connection cleanly between two frames
     +-- HandshakeRefused     one side refused the other during the handshake (reason code + text)
     |    +-- AuthError           ... because peer authentication failed
     +-- HookError            a hook command or built-in action failed, timed out or was cancelled
     +-- TLSError             TLS between two nodes failed: a certificate refused, or TLS on one side only
"""

from __future__ import annotations

from pathlib import Path


class ReplError(Exception):
    """Base class of every error that repctl reports to a user rather than as a bug."""


class ConfigError(ReplError):
    """The configuration is invalid.

    Names the file, the key path inside it (``resources.r0.nodes.beta.device``), what was expected
    and what was found, plus the line when it is known.
    """

    def __init__(
        self,
        file: str | Path,
        key: str | None,
        expected: str,
        got: str,
        *,
        line: int | None = None,
    ) -> None:
        self.file = str(file)
        self.key = key
        self.expected = expected
        self.got = got
        self.line = line
        where = self.file if line is None else f"{self.file}:{line}"
        what = f"{key}: " if key else ""
        super().__init__(f"{where}: {what}expected {expected}, got {got}")


class ProtocolError(ReplError):
    """The peer sent something that breaks the wire protocol (bad frame, bad order, bad payload).

    The connection cannot be trusted afterwards and must be closed.
    """


class ConnectionClosed(ProtocolError):
    """The peer closed the connection between two frames (an orderly end, not a truncation)."""


class HandshakeRefused(ReplError):
    """The connection was refused during the handshake.

    ``reason`` is the protocol's refusal code (`repctl.protocol.RefuseReason`), ``text`` the human
    explanation. ``remote`` is True when the peer refused us (we received its REFUSE frame) and
    False when we refused the peer (we sent REFUSE).
    """

    def __init__(self, reason: int, text: str, *, remote: bool = False) -> None:
        self.reason = reason
        self.text = text
        self.remote = remote
        name = getattr(reason, "name", str(int(reason)))
        who = "peer refused the connection" if remote else "refused the peer"
        super().__init__(f"{who} ({name}): {text}")


class AuthError(HandshakeRefused):
    """Peer authentication failed (another shared secret, or a peer not who it claims to be)."""


class TLSError(ReplError):
    """TLS between two nodes failed (repctl.tls): a certificate refused by either side (another
    CA, expired, not issued for the node), or TLS configured on one side only. The message says
    which and what to check; the connection is unusable.
    """


class HookError(ReplError):
    """A hook command or a built-in action (mount, address, service) failed its step.

    The message names what ran, how it ended (exit status, signal, timeout, cancel) and the last
    lines of its output. Raised by `repctl.hooks`; the step that ran the hook did not complete.
    """
