"""Every named state of the daemon, in one place.

Each is a `StrEnum` whose values are the words that `repctl status`, `repctl events` and the
JSON documents show (docs/cli.md lists them): a member serialises as that word, and a word read
back (from a state file or a status document) converts with ``State(word)``. Members are
appended, never renamed: scripts match on these words.

Nothing here imports anything of the daemon, so that the CLI can name states without loading it.
"""

from __future__ import annotations

from enum import StrEnum, unique

from repctl.config import SplitBrainPolicy

__all__ = ["Admin", "Connection", "DiskState", "Event", "LinkState", "ReplicaState", "Role",
           "split_brain_refusal", "transition_refusal"]


@unique
class Role(StrEnum):
    """What this node is for a resource; persisted in ``role.json`` (docs/failover.md). The
    primary exposes ``/dev/mapper/<resource>`` and replicates to every other node; a secondary
    receives."""

    PRIMARY = "primary"
    SECONDARY = "secondary"


@unique
class DiskState(StrEnum):
    """What a node's copy is worth, in the words DRBD users know (docs/failover.md)."""

    UP_TO_DATE = "UpToDate"        # the primary's data, or a secondary streaming in sync with it
    CONSISTENT = "Consistent"      # a whole, crash-consistent copy; may lack the newest writes
    INCONSISTENT = "Inconsistent"  # mid-resync or never synced: not usable as it is
    OUTDATED = "Outdated"          # known to lack writes (a former primary's peer set it so)
    DISKLESS = "Diskless"          # the backing device cannot be opened


def transition_refusal(old: Role, new: Role, disk: DiskState, *, force: bool = False) -> str | None:
    """Why the role change `old` -> `new` of a node whose copy is `disk` is refused, or None
    when it is valid (DRBD's is_valid_transition). The one rule book for every role change;
    the checks that need the network or the device (a peer still primary, the fence hook, the
    device in use) come on top of it, in the service."""
    if old is new:
        return f"this node is already {new}"
    if new is Role.SECONDARY:
        return None
    if disk is DiskState.DISKLESS:
        return "this node has no usable disk (Diskless): nothing to promote"
    if disk in (DiskState.INCONSISTENT, DiskState.OUTDATED) and not force:
        return (f"this node's data is {disk}: promoting it would serve data that is "
                f"{'incomplete' if disk is DiskState.INCONSISTENT else 'known to be old'}; "
                "--force overrides this check")
    return None


def split_brain_refusal(policy: SplitBrainPolicy, *, mine: int, theirs: int,
                        younger: bool | None) -> str | None:
    """Why a primary, on meeting a secondary whose data diverged from its own, does not discard
    the secondary's changes by `policy`; None when it does (DRBD's after-sb-0pri/1pri, with the
    secondary as the only possible victim: a primary serving its device is never overwritten by
    itself). `mine`/`theirs`: the chunks each side changed since they parted; `younger`: whether
    the secondary became primary after this node did (None: cannot be told)."""
    if policy is SplitBrainPolicy.DISCONNECT:
        return "the policy is disconnect: `repctl resolve --discard-local` on the victim"
    if policy is SplitBrainPolicy.DISCARD_ZERO_CHANGES:
        if theirs == 0:
            return None
        return (f"discard-zero-changes: the secondary changed {theirs} chunks since the split"
                f"{'' if mine else ' and this primary none'}; only a side with no change is "
                "discarded, and never the primary")
    if policy is SplitBrainPolicy.DISCARD_LEAST_CHANGES:
        if theirs < mine:
            return None
        return (f"discard-least-changes: the secondary changed {theirs} chunks since the split, "
                f"this primary {mine}; only the side with fewer changes is discarded"
                f"{' (a tie settles nothing)' if theirs == mine else ''}, and never the primary")
    if younger:
        return None
    return ("discard-younger-primary: " + ("this primary became primary after the secondary did"
            if younger is False else "both became primary after they parted and the generations "
            "cannot tell which did last") + "; never the primary is discarded")


@unique
class Admin(StrEnum):
    """What the administrator asked of a target (`pause`, `resume`, `disconnect`, `connect`);
    persisted in ``<target>.json`` on the source."""

    UP = "up"
    PAUSED = "paused"
    DISCONNECTED = "disconnected"


@unique
class LinkState(StrEnum):
    """A target's mirror state, as its source sees it (the `state` of a target in `status`)."""

    CONNECTING = "connecting"      # no session: connecting, or waiting to retry
    SYNCING = "syncing"            # in session, resyncing its out-of-sync chunks
    STREAMING = "streaming"        # in session, in sync, following the ring
    PAUSED = "paused"              # stopped by the administrator at a consistent point
    BEHIND = "behind"              # was streaming, fell behind into its bitmap, catching up
    DISCONNECTED = "disconnected"  # disconnected by the administrator
    FAILED = "failed"              # an internal error; retried after a delay

    @classmethod
    def of_admin(cls, admin: Admin) -> LinkState:
        """The state a target is held in while the administrator keeps it out of session."""
        return cls.PAUSED if admin is Admin.PAUSED else cls.DISCONNECTED


@unique
class Connection(StrEnum):
    """The `connection` of a resource or a target in `status`."""

    CONNECTED = "connected"    # a session is up
    CONNECTING = "connecting"  # the source tries to connect
    REFUSED = "refused"        # the last handshake was refused (the reason follows)
    DOWN = "down"              # the source does not try: paused or disconnected
    WAITING = "waiting"        # a target waits for its source


@unique
class ReplicaState(StrEnum):
    """A target node's own state of its copy (the `state` of a target resource in `status`)."""

    DISCONNECTED = "disconnected"
    SYNCING = "syncing"
    STREAMING = "streaming"
    PAUSED = "paused"
    FAILED = "failed"


@unique
class Event(StrEnum):
    """The `what` of an event (`repctl events`)."""

    UP = "up"                          # a resource came up
    DOWN = "down"                      # a resource went down
    STATE = "state"                    # a target changed state: `old`, `new`, `text`
    ERROR = "error"                    # an error worth the administrator's eyes: `text`
    FAILED = "failed"                  # a resource failed and stopped: `text`
    FELL_BEHIND = "fell_behind"        # the kernel stopped its ring: `text` is its reason
    NEW_GENERATION = "new_generation"  # the source started a new data generation: `text`
    ROLE = "role"                      # this node's role changed: `old`, `new`, `text`
    DISK = "disk"                      # a secondary's disk state changed: `old`, `new`, `text`
    SPLIT_BRAIN = "split_brain"        # a peer's data diverged from ours: `peer`, `text`
    CONNECTION = "connection"          # a target's `connection` changed: `old`, `new`, `text`
    PROGRESS = "progress"              # a resync's progress: `done_bytes`, `total_bytes`, ...
    RESYNC_QUEUED = "resync_queued"    # a resync waits for a slot: `position`, `text`
    RESYNC_STARTED = "resync_started"  # a resync that waited got its slot: `waited_s`, `text`
