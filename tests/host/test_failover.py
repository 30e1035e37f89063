"""Issue 11 without a kernel: the role rules, the OUT_OF_SYNC report, what a promoted node starts
from, when a former primary may rejoin, and promote's refusals (which all come before anything
changes). The VM tier (tests/vm/test_failover.py) runs the role changes on the real module."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from repctl import metadata
from repctl import protocol as P
from repctl.config import SplitBrainPolicy
from repctl.daemon import Daemon
from repctl.daemon.base import local_changes
from repctl.daemon.failover import (
    Probe,
    ProbeKind,
    load_role,
    may_rejoin,
    save_role,
    start_as_primary,
)
from repctl.daemon.state import DiskState, Role, split_brain_refusal, transition_refusal
from repctl.errors import HandshakeRefused, ProtocolError, ReplError
from repctl.oos import OOSBitmap
from test_daemon_safety import CHUNK, SIZE, Target, make_source, until, write_config

NR = SIZE // CHUNK  # chunks of the test device
D = DiskState


# ----------------------------------------------------------------------------- the rule book


@pytest.mark.parametrize(("old", "new", "disk", "force", "refused"), [
    (Role.SECONDARY, Role.PRIMARY, D.UP_TO_DATE, False, None),
    (Role.SECONDARY, Role.PRIMARY, D.CONSISTENT, False, None),
    (Role.SECONDARY, Role.PRIMARY, D.INCONSISTENT, False, "Inconsistent"),
    (Role.SECONDARY, Role.PRIMARY, D.INCONSISTENT, True, None),
    (Role.SECONDARY, Role.PRIMARY, D.OUTDATED, False, "Outdated"),
    (Role.SECONDARY, Role.PRIMARY, D.OUTDATED, True, None),
    (Role.SECONDARY, Role.PRIMARY, D.DISKLESS, False, "Diskless"),
    (Role.SECONDARY, Role.PRIMARY, D.DISKLESS, True, "Diskless"),  # --force is for data only
    (Role.PRIMARY, Role.PRIMARY, D.UP_TO_DATE, False, "already primary"),
    (Role.SECONDARY, Role.SECONDARY, D.UP_TO_DATE, False, "already secondary"),
    (Role.PRIMARY, Role.SECONDARY, D.UP_TO_DATE, False, None),
    (Role.PRIMARY, Role.SECONDARY, D.INCONSISTENT, False, None),
])  # fmt: skip
def test_every_transition(old: Role, new: Role, disk: DiskState, force: bool,
                          refused: str | None) -> None:
    why = transition_refusal(old, new, disk, force=force)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


def test_the_role_file(tmp_path: Path) -> None:
    cfg = write_config(tmp_path).resource("r0")
    assert load_role(tmp_path, cfg, "alpha") is Role.PRIMARY  # the config's source, at first
    assert load_role(tmp_path, cfg, "beta") is Role.SECONDARY
    save_role(tmp_path, Role.SECONDARY)
    assert load_role(tmp_path, cfg, "alpha") is Role.SECONDARY
    (tmp_path / "role.json").write_text('{"role": "boss"}')
    assert load_role(tmp_path, cfg, "alpha") is Role.SECONDARY  # never two primaries by accident
    assert list(tmp_path.glob("role.json.corrupt-*"))


# ----------------------------------------------------------------------------- OUT_OF_SYNC


def test_a_bitmap_crosses_in_pieces_and_back() -> None:
    nbytes = P.MAX_OOS_PIECE * 2 + 5
    bits = bytes((i * 7) & 0xFF for i in range(nbytes))
    pieces = P.out_of_sync_pieces(bits)
    assert [p.last for p in pieces] == [False, False, True]
    a, b = socket.socketpair()
    with a, b:
        rx, tx = P.FramedConnection(a), P.FramedConnection(b)
        for piece in pieces:
            tx.send_message(piece)
            assert rx.recv_message() == piece  # compressed on the wire, the same bits back
        for piece in pieces:
            tx.send_message(piece)
        assert P.receive_out_of_sync(rx, nbytes) == bits


def test_an_empty_report_means_no_chunk() -> None:
    a, b = socket.socketpair()
    with a, b:
        tx = P.FramedConnection(b)
        for piece in P.out_of_sync_pieces(b""):
            tx.send_message(piece)
        assert P.receive_out_of_sync(P.FramedConnection(a), 128) == bytes(128)


@pytest.mark.parametrize(("frames", "error"), [
    ([P.OutOfSync(0, b"\x01" * 8, False), P.OutOfSync(16, b"\x01" * 8, True)], "does not follow"),
    ([P.OutOfSync(0, b"\x01" * 8, True)], "bitmap of 8 bytes, expected 16"),
    ([P.OutOfSync(0, b"\x01" * 20, True)], "does not follow"),
    ([P.Ping(1)], "expected OUT_OF_SYNC"),
])  # fmt: skip
def test_a_malformed_report_is_refused(frames: list[P.Message], error: str) -> None:
    a, b = socket.socketpair()
    with a, b:
        tx = P.FramedConnection(b)
        for f in frames:
            tx.send_message(f)
        with pytest.raises(ProtocolError, match=error):
            P.receive_out_of_sync(P.FramedConnection(a), 16)


def test_a_forged_piece_is_refused() -> None:
    good = P.OutOfSync(0, b"\xff" * 64, True)
    head, body = good.encode()
    with pytest.raises(ProtocolError, match="holds another amount"):
        P.decode(P.FrameType.OUT_OF_SYNC, memoryview(bytes(head)[:8] + (65).to_bytes(4, "little")
                                                     + bytes(head)[12:] + bytes(body)))
    with pytest.raises(ProtocolError, match="does not decompress"):
        P.decode(P.FrameType.OUT_OF_SYNC, memoryview(bytes(head) + b"not zlib"))


def test_absorbing_a_report_ignores_bits_past_the_device(tmp_path: Path) -> None:
    oos = OOSBitmap(tmp_path / "x.oos", 10)  # 10 chunks in 2 bytes
    assert oos.absorb_masked(b"\x01\xff") == 3  # chunks 0, 8, 9; bits 10-15 are no chunks
    assert oos.count() == 3 and [list(r) for r in oos.runs(16)] == [[0], [8, 9]]
    assert oos.absorb_masked(b"\x03\x00") == 1  # only chunk 1 is new
    with pytest.raises(ValueError):
        oos.absorb_masked(b"\x00")


# ----------------------------------------------------------------------------- a former primary


def _meta(tmp_path: Path, dirty: list[int]) -> Path:
    """A metadata file formatted for the test device with `dirty` chunks set on disk."""
    meta = tmp_path / "md.img"
    with open(meta, "wb") as f:
        f.truncate(metadata.metadata_bytes(SIZE // 512))
    metadata.format_metadata(meta, SIZE // 512, CHUNK // 512)
    bits = bytearray(NR // 8)
    for c in dirty:
        bits[c // 8] |= 1 << (c % 8)
    with open(meta, "r+b") as f:
        f.seek(metadata.BLOCK * 1)  # REPL_BITMAP_START_BLOCK
        f.write(bits)
    assert metadata.read_bitmap(meta)[1] == bytes(bits)
    return meta


def _bits(chunks: list[int], nr: int = NR) -> bytes:
    return sum(1 << c for c in chunks).to_bytes(-(-nr // 8), "little")


def test_local_changes_are_the_oos_and_the_dirty_bitmap(tmp_path: Path) -> None:
    meta = _meta(tmp_path, [3, 700])
    (tmp_path / "beta.oos").write_bytes(_bits([5, 700, NR - 1]))
    assert local_changes(tmp_path, meta, "beta", NR) == _bits([3, 5, 700, NR - 1])
    # no bitmap kept for that peer: it may lack anything
    assert local_changes(tmp_path, meta, "gamma", NR) == _bits(list(range(NR)))
    # the metadata cannot be read: every chunk, never less than the truth
    assert local_changes(tmp_path, tmp_path / "nothing", "beta", NR) == _bits(list(range(NR)))


def test_a_promoted_node_starts_from_a_new_generation_and_known_bitmaps(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    cfg = config.resource("r0")
    folder = tmp_path / "st"
    folder.mkdir()
    new = start_as_primary(folder, cfg, "beta", P.Generations(7, (5,)), "alpha", "uuid-b")
    assert new.current not in (0, 7) and new.history == (7, 5)
    gen = json.loads((folder / "generation.json").read_text())
    assert gen == {"current": new.current, "history": [7, 5], "md_uuid": "uuid-b"}
    # alpha differs from beta only by alpha's own changes, which alpha reports: an empty bitmap
    assert (folder / "alpha.oos").read_bytes() == bytes(NR // 8)
    assert json.loads((folder / "alpha.json").read_text())["peer_gen"] == 7


@pytest.mark.parametrize("own_changes", [True, False])
def test_a_promoted_node_clears_a_dirty_bitmap_a_resync_made_stale(tmp_path: Path,
                                                                    own_changes: bool) -> None:
    """Bits from writes as an earlier primary, overwritten since by a resync from the primary
    it followed, would be resent at every later resync: cleared. Its own changes are kept."""
    cfg = write_config(tmp_path).resource("r0")
    meta = _meta(tmp_path, [3, 700])  # the path write_config gives the metadata
    assert str(cfg.nodes["alpha"].metadata) == str(meta)
    folder = tmp_path / "st"
    folder.mkdir()
    start_as_primary(folder, cfg, "alpha", P.Generations(7), "beta", "u",
                     own_changes=own_changes)
    sb, dirty = metadata.read_bitmap(meta)
    assert dirty == (_bits([3, 700]) if own_changes else bytes(NR // 8))
    assert sb.nr_chunks == NR  # the superblock is untouched


def test_a_promoted_node_knows_nothing_of_a_peer_it_did_not_sync_from(tmp_path: Path) -> None:
    cfg = write_config(tmp_path).resource("r0")
    folder = tmp_path / "st"
    folder.mkdir()
    start_as_primary(folder, cfg, "beta", P.Generations(7), None, "u")
    assert OOSBitmap(folder / "alpha.oos", NR).count() == NR  # a full sync
    assert json.loads((folder / "alpha.json").read_text())["peer_gen"] is None


def _primary(peer: str, current: int, history: tuple[int, ...]) -> Probe:
    return Probe(peer, ProbeKind.PRIMARY, "primary", P.Generations(current, history))


@pytest.mark.parametrize(("in_session", "changed", "rejoins"), [
    (True, [1, 2, 3], True),    # crashed while beta was in session: its changes were in flight
    (False, [], True),          # out of session, but wrote nothing beta lacks
    (False, [9], False),        # out of session and wrote: a split brain, never silent
])  # fmt: skip
def test_a_former_primary_rejoins_only_when_nothing_it_wrote_is_lost_silently(
        tmp_path: Path, in_session: bool, changed: list[int], rejoins: bool) -> None:
    config = write_config(tmp_path)
    cfg = config.resource("r0")
    folder = tmp_path / "st"
    folder.mkdir()
    meta = _meta(tmp_path, [])
    cfg = type(cfg)(**{**cfg.__dict__, "nodes": {**cfg.nodes, "alpha": type(cfg.nodes["alpha"])(
        "alpha", cfg.nodes["alpha"].address, cfg.nodes["alpha"].device, meta)}})
    (folder / "beta.json").write_text(json.dumps({"admin": "up", "in_session": in_session}))
    (folder / "beta.oos").write_bytes(_bits(changed))
    why = may_rejoin(folder, cfg, "alpha", P.Generations(7), _primary("beta", 9, (7,)))
    if rejoins:
        assert why is None
    else:
        assert why is not None and "split brain" in why and "1 chunks" in why
        assert "repctl resolve r0 --discard-local" in why


def test_a_former_primary_never_rejoins_data_that_does_not_descend_from_its_own(
        tmp_path: Path) -> None:
    cfg = write_config(tmp_path).resource("r0")
    (tmp_path / "beta.json").write_text(json.dumps({"admin": "up", "in_session": True}))
    why = may_rejoin(tmp_path, cfg, "alpha", P.Generations(7, (3,)), _primary("beta", 9, (3,)))
    assert why is not None and "diverged" in why and "split brain" in why


# ----------------------------------------------------------------------------- the secondary


def test_a_secondary_reports_its_own_changes_once(tmp_path: Path) -> None:
    """A former primary tells the new primary which chunks it changed; after a completed resync
    it has none left to report."""
    (tmp_path / "st" / "r0").mkdir(parents=True)
    (tmp_path / "st" / "r0" / "alpha.oos").write_bytes(_bits([4, 1000]))
    (tmp_path / "st" / "r0" / "target.json").write_text(json.dumps(
        {"current": 7, "history": [], "consistent": True, "local_changes": True}))
    t = Target(tmp_path)
    try:
        conn = t.connect()  # beta has no metadata device: its bitmap for alpha says it all
        assert t.report == _bits([4, 1000])
        conn.send_message(P.ResyncDone(0))
        conn.send_message(P.Ping(1))
        while not isinstance(conn.recv_message(), P.Pong):
            pass
        conn.close()
        assert json.loads((tmp_path / "st" / "r0" / "target.json").read_text())[
            "local_changes"] is False
        until(lambda: t.res.conn is None, "the first connection to end")
        t.connect().close()
        assert t.report == bytes(NR // 8)
    finally:
        t.stop()


# ----------------------------------------------------------------------------- split-brain policies

G0, G, GA, GB = 0x10, 0x20, 0x30, 0x40  # a common ancestor, the primary's, two diverged ones


@pytest.mark.parametrize("policy", list(SplitBrainPolicy))
@pytest.mark.parametrize(("theirs", "mine", "younger"), [(0, 0, True), (0, 5, False),
                                                        (2, 5, True), (5, 5, True), (8, 5, True),
                                                        (2, 5, None), (2, 5, False)])
def test_the_policies(policy: SplitBrainPolicy, theirs: int, mine: int,
                      younger: bool | None) -> None:
    """The secondary is the only possible victim; each policy names when it is one."""
    why = split_brain_refusal(policy, mine=mine, theirs=theirs, younger=younger)
    settled = {SplitBrainPolicy.DISCONNECT: False,
               SplitBrainPolicy.DISCARD_ZERO_CHANGES: theirs == 0,
               SplitBrainPolicy.DISCARD_LEAST_CHANGES: theirs < mine,
               SplitBrainPolicy.DISCARD_YOUNGER_PRIMARY: younger is True}[policy]
    assert (why is None) is settled, why
    if why is not None:
        assert policy.value in why or "resolve" in why


def _chunks(oos: OOSBitmap) -> list[int]:
    return [c for run in oos.runs(NR) for c in run]


def _diverged(tmp_path: Path, policy: str, *, theirs: list[int], mine: list[int],
              target_gens: tuple[int, list[int]], primary_gens: tuple[int, list[int]],
              peer_gen: int | None) -> tuple[Target, Any]:
    """A secondary beta holding `target_gens` and `theirs` changed chunks, and a primary alpha
    holding `primary_gens` whose bitmap for beta (kept against `peer_gen`) holds `mine`."""
    folder = tmp_path / "st" / "r0"
    folder.mkdir(parents=True)
    (folder / "alpha.oos").write_bytes(_bits(theirs))
    current, history = target_gens
    (folder / "target.json").write_text(json.dumps(
        {"current": current, "history": history, "consistent": True, "local_changes": True}))
    (folder / "beta.json").write_text(json.dumps({"admin": "up", "peer_gen": peer_gen}))
    (folder / "beta.oos").write_bytes(_bits(mine))
    hook = tmp_path / "hook"
    hook.write_text(f"#!/bin/sh\necho $REPCTL_EVENT $REPCTL_PEER >> {tmp_path / 'hooks.log'}\n")
    hook.chmod(0o755)
    t = Target(tmp_path, resource={"after_split_brain": policy,
                                   "hooks": {"split-brain": str(hook)}})
    res = make_source(tmp_path, config=t.config)
    res.gen = {"current": primary_gens[0], "history": primary_gens[1]}
    return t, res


@pytest.mark.parametrize(("policy", "theirs", "mine", "target_gens", "peer_gen", "outcome"), [
    # beta was promoted from alpha's generation, wrote, and was demoted: the younger primary
    ("discard-younger-primary", [1, 4, 5], [2], (GB, [G]), G, "settled"),
    ("discard-least-changes", [1], [2, 3], (GB, [G]), G, "settled"),
    ("discard-least-changes", [1, 4], [2, 3], (GB, [G]), G, "tie"),
    ("discard-zero-changes", [], [2], (GB, [G]), G, "settled"),
    ("discard-zero-changes", [1], [2], (GB, [G]), G, "changed 1 chunks"),
    # both promoted after they parted from G0: which was later cannot be told
    ("discard-younger-primary", [1], [2, 3], (GB, [G0]), G0, "cannot tell"),
    ("discard-least-changes", [1], [2, 3], (GB, [G0]), G0, "settled"),
    # a bitmap kept against no generation beta's data descends from counts nothing
    ("discard-least-changes", [1], [2, 3], (GB, [G0]), None, "cannot be counted"),
    ("disconnect", [1], [2, 3], (GB, [G]), G, "after_split_brain is disconnect"),
])
def test_a_diverged_secondary_is_discarded_only_as_the_policy_says(
        tmp_path: Path, policy: str, theirs: list[int], mine: list[int],
        target_gens: tuple[int, list[int]], peer_gen: int | None, outcome: str) -> None:
    """The primary counts both sides' changes after the secondary's report; settled, the bitmap
    is the union (the secondary's chunks overwritten, the hook run first); refused, nothing
    changed on either side and the secondary is told why."""
    primary = (G, [G0]) if peer_gen != G0 else (GA, [G0])
    t, res = _diverged(tmp_path, policy, theirs=theirs, mine=mine, target_gens=target_gens,
                       primary_gens=primary, peer_gen=peer_gen)
    link = res.link("beta")
    target_state = (tmp_path / "st" / "r0" / "target.json").read_bytes()
    try:
        if outcome == "settled":
            conn = link._connect()
            conn.close()
            assert _chunks(link.oos) == sorted({*theirs, *mine})
            assert (tmp_path / "hooks.log").read_text().split() == ["split-brain", "beta"]
        else:
            with pytest.raises(HandshakeRefused, match=outcome) as e:
                link._connect()
            assert e.value.reason == P.RefuseReason.SPLIT_BRAIN
            assert _chunks(link.oos) == mine  # nothing absorbed
            assert not (tmp_path / "hooks.log").exists()  # reported once by the link loop
            if policy != "disconnect":  # refused after the report: beta is told why
                until(lambda: "split brain" in str(t.res.last_error), "beta told")
        until(lambda: t.res.conn is None, "the connection to end")
        assert (tmp_path / "st" / "r0" / "target.json").read_bytes() == target_state
    finally:
        t.stop()


def test_a_failing_split_brain_hook_refuses_the_settlement(tmp_path: Path) -> None:
    t, res = _diverged(tmp_path, "discard-least-changes", theirs=[1], mine=[2, 3],
                       target_gens=(GB, [G]), primary_gens=(G, []), peer_gen=G)
    (tmp_path / "hook").write_text("#!/bin/sh\nexit 4\n")
    link = res.link("beta")
    try:
        with pytest.raises(HandshakeRefused, match="not settled.*split-brain hook"):
            link._connect()
        assert _chunks(link.oos) == [2, 3]
    finally:
        t.stop()


# ----------------------------------------------------------------------------- promote's refusals


def _secondary_daemon(tmp_path: Path, **kw: Any) -> Daemon:
    config = write_config(tmp_path, **kw)
    d = Daemon(config, "beta")
    d.start()
    assert not d.failed, d.failed
    return d


def _state_files(tmp_path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp_path)): p.read_bytes()
            for p in sorted((tmp_path / "st").rglob("*")) if p.is_file()}


def test_promote_is_refused_while_the_primary_is_reachable(tmp_path: Path) -> None:
    d = _secondary_daemon(tmp_path, beta_metadata=True)
    alpha = make_source(tmp_path, config=d.config)
    alpha.gen = {"current": 7, "history": []}  # as start() leaves it
    alpha.listener.start()  # the primary's port answers: ROLE_CONFLICT
    try:
        before = _state_files(tmp_path)
        with pytest.raises(ReplError, match="alpha is reachable and primary; run `repctl "
                                            "demote r0` on alpha first"):
            d.promote("r0")
        assert _state_files(tmp_path) == before  # nothing changed
        assert d.status()["resources"][0]["role"] == "secondary"
    finally:
        alpha.listener.stop()
        d.stop()


def test_promote_of_an_inconsistent_copy_needs_force(tmp_path: Path) -> None:
    (tmp_path / "st" / "r0").mkdir(parents=True)
    (tmp_path / "st" / "r0" / "target.json").write_text(json.dumps(
        {"current": 0, "history": [], "consistent": False}))
    d = _secondary_daemon(tmp_path, beta_metadata=True)
    try:
        assert d.status()["resources"][0]["disk"] == "Inconsistent"
        with pytest.raises(ReplError, match="Inconsistent.*--force overrides"):
            d.promote("r0")
        # --force passes that check and stops at the next one: beta's copy is an image file
        with pytest.raises(ReplError, match="image file"):
            d.promote("r0", force=True)
        assert d.status()["resources"][0]["role"] == "secondary"
    finally:
        d.stop()


def test_promote_of_a_node_without_metadata_is_refused(tmp_path: Path) -> None:
    d = _secondary_daemon(tmp_path)
    try:
        cfg = d.config.resource("r0")
        assert cfg.nodes["beta"].metadata is None
        with pytest.raises(ReplError, match="has no metadata device .*nodes.beta.metadata"):
            d.promote("r0")
    finally:
        d.stop()


def test_demote_and_resolve_refuse_where_they_mean_nothing(tmp_path: Path) -> None:
    d = _secondary_daemon(tmp_path)
    try:
        with pytest.raises(ReplError, match="beta is a secondary"):
            d.demote("r0")
        with pytest.raises(ReplError, match="--discard-local"):
            d.resolve("r0")
    finally:
        d.stop()


def test_resolve_runs_the_split_brain_hook_first(tmp_path: Path) -> None:
    """A failing split-brain hook (it would snapshot the victim's data) refuses the resolution:
    the secondary stays up with its state files as they were."""
    d = _secondary_daemon(tmp_path, resource={"hooks": {"split-brain": "/bin/false"}})
    try:
        before = _state_files(tmp_path)
        with pytest.raises(ReplError, match="split-brain hook"):
            d.resolve("r0", discard_local=True)
        assert _state_files(tmp_path) == before
        assert d.status()["resources"][0]["role"] == "secondary"
    finally:
        d.stop()


def test_the_secondary_status_shows_role_and_disk(tmp_path: Path) -> None:
    d = _secondary_daemon(tmp_path)
    try:
        (r0,) = d.status()["resources"]
        assert (r0["role"], r0["disk"], r0["source"]) == ("secondary", "Consistent", None)
    finally:
        d.stop()


def test_a_secondary_runs_the_resync_hooks_around_a_resync(tmp_path: Path) -> None:
    """before-resync-target runs before the copy changes, and a failure keeps it consistent and
    ends the connection; after-resync-target runs once the resync made it whole again."""
    log, veto = tmp_path / "hooks.log", tmp_path / "veto"
    script = tmp_path / "hook"
    script.write_text(f"#!/bin/sh\ntest ! -e {veto} || exit 3\n"
                      f"echo $REPCTL_EVENT $REPCTL_PEER $REPCTL_ROLE >> {log}\n")
    script.chmod(0o755)
    (tmp_path / "st" / "r0").mkdir(parents=True)
    (tmp_path / "st" / "r0" / "target.json").write_text(json.dumps(
        {"current": 7, "history": [], "consistent": True}))
    hooks = {"before-resync-target": str(script), "after-resync-target": str(script)}
    t = Target(tmp_path, resource={"hooks": hooks})
    events = t.res.events.subscribe()
    try:
        veto.touch()
        conn = t.connect()
        conn.send_message(P.ResyncChunk(0, b"x" * CHUNK))
        with pytest.raises((ProtocolError, OSError)):
            for _ in range(3):
                conn.recv_message()
        until(lambda: t.res.conn is None, "the connection to end")
        assert "before-resync-target hook" in str(t.res.last_error)
        assert t.res.disk_state() is DiskState.CONSISTENT  # the copy did not change
        assert not log.exists()

        veto.unlink()
        conn = t.connect()
        conn.send_message(P.ResyncChunk(0, b"x" * CHUNK))
        conn.send_message(P.ResyncDone(1))
        conn.send_message(P.Ping(1))
        while not isinstance(conn.recv_message(), P.Pong):
            pass
        assert log.read_text().splitlines() == ["before-resync-target alpha secondary",
                                                "after-resync-target alpha secondary"]
        conn.close()
        until(lambda: t.res.conn is None, "the connection to end")
        disks = [(e["old"], e["new"]) for e in seen(events) if e["what"] == "disk"]
        # never UpToDate before the primary said the copy is in sync (RESYNC_DONE): a vetoed
        # session leaves it Consistent throughout
        assert disks == [("Consistent", "Inconsistent"), ("Inconsistent", "UpToDate"),
                         ("UpToDate", "Consistent")], disks
    finally:
        t.stop()


def test_a_table_names_its_device_by_path_or_number() -> None:
    """The repl target repeats the table as given (a path): the device found up at start is
    ours only if that path or MAJ:MIN is our data device."""
    from repctl.daemon.source import _same_device

    null = os.stat("/dev/null").st_rdev
    assert _same_device("/dev/null", null)
    assert _same_device(f"{os.major(null)}:{os.minor(null)}", null)
    assert not _same_device("/dev/zero", null)
    assert not _same_device("/nonexistent", null)
    assert not _same_device("1:x", null)


def seen(q: Any) -> list[dict[str, Any]]:
    return [q.get(timeout=1) for _ in range(q.qsize())]
