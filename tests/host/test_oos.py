"""The out-of-sync bitmap file (repctl.oos): created atomically once, then only the changed pages
written in place; any mix of old and new pages a crash can leave keeps P2 (see the module's
docstring); the bits, the count and the runs agree with a plain model of the bitmap."""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from repctl import oos as O
from repctl.oos import OOSBitmap
from repctl.statefile import StateError

PAGE = O.PAGE
PC = O.PAGE_CHUNKS  # chunks per page of the bitmap


def bits_of(chunks: list[int] | range, nr_chunks: int) -> bytes:
    """A bitmap of `nr_chunks` with `chunks` set, in the file's layout."""
    out = bytearray(-(-nr_chunks // 8))
    for c in chunks:
        out[c >> 3] |= 1 << (c & 7)
    return bytes(out)


def chunks_of(data: bytes) -> set[int]:
    """The chunks set in a bitmap."""
    return {k * 8 + b for k, byte in enumerate(data) if byte for b in range(8) if byte >> b & 1}


def model_runs(chunks: set[int], max_chunks: int, start: int = 0) -> list[range]:
    out: list[range] = []
    for c in sorted(c for c in chunks if c >= start):
        if out and out[-1].stop == c and len(out[-1]) < max_chunks:
            out[-1] = range(out[-1].start, c + 1)
        else:
            out.append(range(c, c + 1))
    return out


class Writes:
    """Records the in-place writes and syncs of repctl.oos (os.pwrite, os.fdatasync)."""

    def __init__(self, monkeypatch: Any) -> None:
        self.pwrites: list[tuple[int, int]] = []  # (offset, length)
        self.syncs = 0
        real_pwrite, real_sync = os.pwrite, os.fdatasync

        def pwrite(fd: int, data: Any, offset: int) -> int:
            n = real_pwrite(fd, data, offset)
            self.pwrites.append((offset, n))
            return n

        def fdatasync(fd: int) -> None:
            self.syncs += 1
            real_sync(fd)

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def pages(self) -> list[int]:
        """Pages written, each once per write that covered it."""
        return [p for off, n in self.pwrites for p in range(off // PAGE, -(-(off + n) // PAGE))]

    def reset(self) -> None:
        self.pwrites.clear()
        self.syncs = 0


def count_atomic(monkeypatch: Any) -> list[Path]:
    """Record every whole-file atomic replacement repctl.oos makes."""
    calls: list[Path] = []
    real = O.atomic_write_open

    def wrapped(path: Path, data: bytes, mode: int = 0o600) -> int:
        calls.append(path)
        return real(path, data, mode)

    monkeypatch.setattr(O, "atomic_write_open", wrapped)
    return calls


# ----------------------------------------------------------------------------- the file


def test_an_old_full_file_bitmap_loads_then_is_updated_in_place(tmp_path: Path,
                                                                monkeypatch: Any) -> None:
    """A file written whole (as every save did before) loads as it is; the next saves keep the
    same file and write only what changed."""
    nr = 3 * PC + 100
    path = tmp_path / "beta.oos"
    old = [0, 7, PC - 1, PC, 2 * PC + 5, nr - 1]
    path.write_bytes(bits_of(old, nr))
    ino = path.stat().st_ino
    oos = OOSBitmap(path, nr)
    assert oos.existed and oos.count() == len(old)
    assert [list(r) for r in oos.runs(8)] == [[0], [7], [PC - 1, PC], [2 * PC + 5], [nr - 1]]
    atomic = count_atomic(monkeypatch)
    writes = Writes(monkeypatch)
    oos.absorb(bits_of([3 * PC + 1], nr))
    oos.save()
    assert writes.pages() == [3] and writes.syncs == 1 and not atomic
    assert path.stat().st_ino == ino
    assert chunks_of(path.read_bytes()) == {*old, 3 * PC + 1}


def test_save_writes_only_the_changed_pages(tmp_path: Path, monkeypatch: Any) -> None:
    nr = 64 * PC  # 64 pages, 256 KiB
    path = tmp_path / "beta.oos"
    oos = OOSBitmap(path, nr)
    oos.absorb(bits_of([5 * PC + 3], nr))
    oos.save()  # creates the file
    writes = Writes(monkeypatch)
    oos.absorb(bits_of([3 * PC, 3 * PC + 9, 40 * PC + 77, 41 * PC], nr))
    oos.save()
    assert writes.pages() == [3, 40, 41] and writes.syncs == 1
    assert sum(n for _, n in writes.pwrites) == 3 * PAGE
    # a page on disk changed behind the object's back: no save writes it again unless its
    # bits change, so what is on disk stays there
    with open(path, "r+b") as f:
        f.seek(10 * PAGE)
        f.write(b"\xaa" * PAGE)
    writes.reset()
    assert oos.clear(range(5 * PC + 3, 5 * PC + 4), oos.epoch)
    oos.absorb(bits_of([3 * PC + 9], nr))  # already set: changes nothing
    oos.save()
    assert writes.pages() == [5]
    data = path.read_bytes()
    assert data[10 * PAGE:11 * PAGE] == b"\xaa" * PAGE  # not written
    assert data[5 * PAGE:6 * PAGE] == bytes(PAGE)
    assert chunks_of(data[:10 * PAGE] + bytes(PAGE) + data[11 * PAGE:]) == {
        3 * PC, 3 * PC + 9, 40 * PC + 77, 41 * PC}
    writes.reset()
    oos.save()  # nothing changed: nothing written, nothing synced
    assert writes.pwrites == [] and writes.syncs == 0


def test_adjacent_changed_pages_go_in_few_writes(tmp_path: Path, monkeypatch: Any) -> None:
    nr = 600 * PC
    oos = OOSBitmap(tmp_path / "x.oos", nr)
    oos.save()
    writes = Writes(monkeypatch)
    oos.set_all()
    oos.save()
    assert writes.pages() == list(range(600)) and writes.syncs == 1
    assert len(writes.pwrites) == 3  # 1 MiB at a time (O.SAVE_PIECE pages)
    assert OOSBitmap(tmp_path / "x.oos", nr).count() == nr


def test_a_missing_file_is_created_atomically_once(tmp_path: Path, monkeypatch: Any) -> None:
    atomic = count_atomic(monkeypatch)
    path = tmp_path / "beta.oos"
    oos = OOSBitmap(path, 1000)
    assert not oos.existed and not path.exists()
    oos.set_all()
    oos.save()
    assert atomic == [path] and path.read_bytes() == bits_of(range(1000), 1000)
    ino = path.stat().st_ino
    oos.clear(range(10), oos.epoch)
    oos.save()
    assert atomic == [path] and path.stat().st_ino == ino
    assert chunks_of(path.read_bytes()) == set(range(10, 1000))
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_wrong_size_file_is_a_state_error_with_its_action(tmp_path: Path) -> None:
    path = tmp_path / "beta.oos"
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(StateError) as e:
        OOSBitmap(path, 1000, action="it was set aside: a full resync")
    assert str(e.value) == (f"{path}: holds 7 bytes, a bitmap of 1000 chunks has 125; "
                            "it was set aside: a full resync")
    assert path.read_bytes() == b"\x00" * 7  # untouched


@pytest.mark.parametrize("how", ["removed", "replaced", "truncated"])
def test_a_file_changed_behind_its_back_is_rewritten_whole(tmp_path: Path, monkeypatch: Any,
                                                           how: str) -> None:
    """In-place writes only go to the file this object wrote or read; any other file at the
    path (set aside, replaced, cut short) is replaced by the whole bitmap."""
    nr = 4 * PC
    path = tmp_path / "beta.oos"
    oos = OOSBitmap(path, nr)
    oos.absorb(bits_of([1, PC + 1], nr))
    oos.save()
    if how == "removed":
        path.rename(tmp_path / "aside")
    elif how == "replaced":
        (tmp_path / "other").write_bytes(bytes(nr // 8))
        (tmp_path / "other").rename(path)
    else:
        os.truncate(path, 100)
    atomic = count_atomic(monkeypatch)
    oos.absorb(bits_of([3 * PC], nr))
    oos.save()
    assert atomic == [path]
    assert chunks_of(path.read_bytes()) == {1, PC + 1, 3 * PC}


@pytest.mark.parametrize("fails", ["pwrite", "fdatasync"])
def test_a_failed_save_is_retried_whole(tmp_path: Path, monkeypatch: Any, fails: str) -> None:
    """After a failed write or sync, what reached the file is unknown: the next save replaces
    it whole, and only then does the in-place path resume."""
    nr = 4 * PC
    path = tmp_path / "beta.oos"
    oos = OOSBitmap(path, nr)
    oos.save()
    real = getattr(os, fails)

    def broken(*args: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, fails, broken)
    oos.absorb(bits_of([2, 2 * PC], nr))
    with pytest.raises(OSError):
        oos.save()
    monkeypatch.setattr(os, fails, real)
    atomic = count_atomic(monkeypatch)
    oos.save()
    assert atomic == [path] and chunks_of(path.read_bytes()) == {2, 2 * PC}
    oos.absorb(bits_of([3 * PC], nr))
    oos.save()
    assert atomic == [path] and chunks_of(path.read_bytes()) == {2, 2 * PC, 3 * PC}


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def test_the_file_descriptor_is_released(tmp_path: Path, monkeypatch: Any) -> None:
    path = tmp_path / "beta.oos"
    oos = OOSBitmap(path, 100)
    oos.save()
    fd = oos._fd
    assert _fd_path(fd) == str(path)
    oos.close()
    assert _fd_path(fd) != str(path)
    atomic = count_atomic(monkeypatch)
    oos.absorb(bits_of([3], 100))
    oos.save()  # after close: a whole, atomic write
    assert atomic == [path] and chunks_of(path.read_bytes()) == {3}
    fd = oos._fd
    del oos
    gc.collect()
    assert _fd_path(fd) != str(path)


def test_a_missing_file_holds_no_descriptor(tmp_path: Path) -> None:
    oos = OOSBitmap(tmp_path / "none.oos", 100)
    assert oos._fd == -1 and oos.count() == 0 and list(oos.runs(10)) == []


# ----------------------------------------------------------------------------- the bits


def test_bits_past_the_last_chunk_are_no_chunks(tmp_path: Path) -> None:
    path = tmp_path / "x.oos"
    path.write_bytes(b"\x00\xff")  # 10 chunks: bits 10-15 of an old file are padding
    oos = OOSBitmap(path, 10)
    assert oos.count() == 2 and [list(r) for r in oos.runs(16)] == [[8, 9]]
    oos.absorb(b"\x01\xfc")  # chunk 0, padding only
    assert oos.count() == 3
    oos.save()
    assert path.read_bytes() == b"\x01\x03"


def test_runs_cross_pages_and_split_at_the_limit(tmp_path: Path) -> None:
    nr = 5 * PC + 3
    oos = OOSBitmap(tmp_path / "x.oos", nr)
    oos.absorb(bits_of([*range(PC - 3, PC + 2), 4 * PC, nr - 1], nr))
    assert [(r.start, r.stop) for r in oos.runs(4)] == [
        (PC - 3, PC + 1), (PC + 1, PC + 2), (4 * PC, 4 * PC + 1), (nr - 1, nr)]
    assert [(r.start, r.stop) for r in oos.runs(100, start=PC)] == [
        (PC, PC + 2), (4 * PC, 4 * PC + 1), (nr - 1, nr)]
    oos.set_all()
    runs = list(oos.runs(256))
    assert len(runs) == -(-nr // 256) and runs[-1] == range(nr - nr % 256, nr)


def test_a_terabyte_bitmap_absorbs_and_saves_a_few_pages(tmp_path: Path,
                                                         monkeypatch: Any) -> None:
    """1 TiB of 4 KiB chunks: a 32 MiB file, 8 KiB of changed-page flags; a sparse absorb
    writes the pages it changed, not the file (the timing is in bench/oos_bench.py)."""
    nr = 1 << 28
    path = tmp_path / "big.oos"
    path.write_bytes(bytes(nr // 8))
    oos = OOSBitmap(path, nr)
    assert oos.nbytes == 32 << 20 and len(oos._dirty) == 8192
    kernel = bytearray(nr // 8)
    for c in (5, 1 << 20, (1 << 20) + 1, 200_000_000, nr - 1):
        kernel[c >> 3] |= 1 << (c & 7)
    writes = Writes(monkeypatch)
    oos.absorb(bytes(kernel))
    oos.save()
    assert sorted(set(writes.pages())) == sorted({c // PC for c in (5, 1 << 20, 200_000_000,
                                                                     nr - 1)})
    assert oos.count() == 5
    assert [r.start for r in oos.runs(256)] == [5, 1 << 20, 200_000_000, nr - 1]


def test_concurrent_changes_and_saves_end_with_the_bits_on_disk(tmp_path: Path) -> None:
    nr = 8 * PC
    path = tmp_path / "x.oos"
    oos = OOSBitmap(path, nr)

    def absorber(seed: int) -> None:
        for i in range(60):
            oos.absorb(bits_of([(seed * 7919 + i * 104_729) % nr], nr))
            oos.save()

    def clearer() -> None:
        for i in range(60):
            oos.clear(range((i * 3001) % nr, (i * 3001) % nr + 500), oos.epoch)
            oos.save()

    with ThreadPoolExecutor(3) as pool:
        done = [pool.submit(absorber, 1), pool.submit(absorber, 2), pool.submit(clearer)]
    for f in done:
        f.result()  # raises what the thread raised
    oos.save()
    assert path.read_bytes() == bytes(oos._bits)
    assert OOSBitmap(path, nr).count() == oos.count() == len(chunks_of(bytes(oos._bits)))


# ----------------------------------------------------------------------------- properties


@contextlib.contextmanager
def small_pages(page: int = 8, piece: int = 2) -> Iterator[None]:
    """Pages of `page` bytes (64 chunks at 8), so that a few hundred chunks span many pages."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(O, "PAGE", page)
        mp.setattr(O, "PAGE_CHUNKS", page * 8)
        mp.setattr(O, "SAVE_PIECE", piece)
        mp.setattr(O, "_ZERO", bytes(page))
        mp.setattr(O, "_ONES", b"\xff" * page)
        yield


chunk_lists = st.lists(st.integers(0, 10_000), max_size=12)
ops = st.lists(st.one_of(
    st.tuples(st.just("absorb"), chunk_lists),
    st.tuples(st.just("masked"), chunk_lists),
    st.tuples(st.just("clear"), st.integers(0, 800), st.integers(0, 300), st.booleans()),
    st.tuples(st.just("set_all")),
    st.tuples(st.just("save")),
    st.tuples(st.just("reload")),
), max_size=25)


@settings(max_examples=150, deadline=None)
@given(nr=st.integers(1, 700), initial=chunk_lists, script=ops)
def test_the_bitmap_agrees_with_a_model(nr: int, initial: list[int], script: list[Any]) -> None:
    """Any sequence of changes, saves and reloads: the bits, count(), runs() and the file agree
    with a plain set of chunks."""
    with small_pages(), tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.oos"
        model = {c % nr for c in initial}
        path.write_bytes(bits_of(sorted(model), nr))
        oos = OOSBitmap(path, nr)
        for op in script:
            if op[0] == "absorb":
                new = {c % (nr + 8) for c in op[1]}  # bits past the last chunk are ignored
                oos.absorb(bits_of(sorted(new), nr + 8)[:oos.nbytes + 1])
                model |= {c for c in new if c < nr}
            elif op[0] == "masked":
                new = {c % nr for c in op[1]}
                assert oos.absorb_masked(bits_of(sorted(new), nr)) == len(new - model)
                model |= new
            elif op[0] == "clear":
                _, start, length, stale = op
                r = range(start % nr, min(start % nr + length, nr))
                epoch = oos.epoch - 1 if stale else oos.epoch
                assert oos.clear(r, epoch) is not stale
                if not stale:
                    model -= set(r)
            elif op[0] == "set_all":
                oos.set_all()
                model = set(range(nr))
            elif op[0] == "save":
                oos.save()
                assert path.read_bytes() == bits_of(sorted(model), nr)
            else:
                oos.save()
                oos = OOSBitmap(path, nr)
            assert oos.count() == len(model)
            assert chunks_of(bytes(oos._bits)) == model
            assert list(oos.runs(5)) == model_runs(model, 5)


@settings(max_examples=150, deadline=None)
@given(nr=st.integers(1, 600), durable=chunk_lists, kernel=chunk_lists, peer=chunk_lists,
       clears=st.lists(st.tuples(st.integers(0, 600), st.integers(1, 200)), max_size=4),
       full=st.booleans(), mix=st.integers(0, (1 << 600) - 1))
def test_a_crash_mid_save_keeps_every_chunk_that_matters(nr: int, durable: list[int],
                                                         kernel: list[int], peer: list[int],
                                                         clears: list[tuple[int, int]],
                                                         full: bool, mix: int) -> None:
    """A crash between the in-place writes and their sync leaves, per bit, the old or the new
    value: any mix (pages, sectors, bits) of the file before and the file the save writes.
    Every chunk the target may lack (set before, or set since: absorbed from the kernel or a
    peer's report, or all of them by set_all; and not cleared as durable on the target since)
    is then in the file or still where it came from: the kernel and the peer forget nothing
    before save() returns, and what made a caller set every chunk holds after a restart too
    (a new target, a new generation, a target holding unrelated data)."""
    with small_pages(), tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.oos"
        d0 = {c % nr for c in durable}
        path.write_bytes(bits_of(sorted(d0), nr))
        oos = OOSBitmap(path, nr)
        k = {c % nr for c in kernel}
        p = {c % nr for c in peer}
        if full:
            oos.set_all()
        oos.absorb(bits_of(sorted(k), nr))
        oos.absorb_masked(bits_of(sorted(p), nr))
        cleared: set[int] = set()
        for start, length in clears:
            r = range(start % nr, min(start % nr + length, nr))
            oos.clear(r, oos.epoch)  # the target holds these durably
            cleared |= set(r)
        old = path.read_bytes()
        with pytest.MonkeyPatch.context() as mp:
            written: list[tuple[int, bytes]] = []
            real = os.pwrite

            def pwrite(fd: int, data: Any, offset: int) -> int:
                written.append((offset, bytes(data)))
                return real(fd, data, offset)

            mp.setattr(os, "pwrite", pwrite)
            oos.save()
        new = bytearray(old)
        for offset, data in written:
            new[offset:offset + len(data)] = data
        assert bytes(new) == path.read_bytes() == bytes(oos._bits)
        everything = set(range(nr)) if full else set()
        lacking = (d0 | k | p | everything) - cleared
        o, n = int.from_bytes(old, "little"), int.from_bytes(new, "little")
        mask = mix & ((1 << nr) - 1)
        crashed = chunks_of(((o & ~mask) | (n & mask)).to_bytes(len(old), "little"))
        assert lacking <= crashed | k | p | everything  # after a crash: set again from its source
        assert lacking <= chunks_of(bytes(new))  # after save(): the file alone holds them
