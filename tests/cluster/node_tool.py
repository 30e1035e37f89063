#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-only
"""Block I/O for the Vagrant cluster tests, run inside a node (standard library only):

    node_tool.py write DEV FIRST COUNT TAG    O_DIRECT|O_SYNC writes of 4 KiB blocks
                                              FIRST..FIRST+COUNT-1; prints `acked N` once
                                              block N is acknowledged (stops quietly at the
                                              first failed write: that one was not)
    node_tool.py check DEV TAG < BLOCKS       every block number on stdin holds what `write`
                                              wrote there; prints the ones that do not, exit 1
    node_tool.py sha256 DEV [BYTES]           digest of the first BYTES (default: all) of DEV

A block's content depends on TAG and its number only, so the host needs no copy of the data:
the numbers it read from `write` are enough to check them on another node.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys

BLOCK = 4096


def content(tag: str, block: int) -> bytes:
    return hashlib.sha256(f"{tag}-{block}".encode()).digest() * (BLOCK // 32)


def write(dev: str, first: int, count: int, tag: str) -> int:
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    try:
        for block in range(first, first + count):
            buf[:] = content(tag, block)
            try:
                os.pwrite(fd, buf, block * BLOCK)
            except OSError as e:
                print(f"failed {block} {e}", flush=True)
                return 0
            print(f"acked {block}", flush=True)
    finally:
        os.close(fd)
    return 0


def check(dev: str, tag: str) -> int:
    blocks = [int(x) for x in sys.stdin.read().split()]
    bad = []
    with open(dev, "rb", buffering=0) as f:
        for block in blocks:
            f.seek(block * BLOCK)
            if f.read(BLOCK) != content(tag, block):
                bad.append(block)
    print(f"checked {len(blocks)} blocks, {len(bad)} wrong")
    if bad:
        print("wrong: " + " ".join(map(str, bad[:50])))
    return 1 if bad else 0


def sha256(dev: str, limit: int | None) -> int:
    h = hashlib.sha256()
    left = limit
    with open(dev, "rb", buffering=0) as f:
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    print(h.hexdigest())
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "write":
        return write(argv[1], int(argv[2]), int(argv[3]), argv[4])
    if len(argv) == 3 and argv[0] == "check":
        return check(argv[1], argv[2])
    if len(argv) in (2, 3) and argv[0] == "sha256":
        return sha256(argv[1], int(argv[2]) if len(argv) == 3 else None)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
