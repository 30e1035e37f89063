"""demo.sh's quick look at a repctl daemon: print its status document, as `repctl status --json`.

    python3 -I -S tests/vm/demo.py CONTROL-SOCKET
    python3 -I -S tests/vm/demo.py --stale DEVICE [CHUNK-SIZE]

Standard library only, so that it starts in a moment even in the emulated test VM, where the
full CLI takes many seconds to import: demo.sh polls with this while it waits for a state, and
runs the real `repctl status` for what it shows. It speaks the control socket's protocol
(docs/cli.md): one JSON request line, one JSON reply line. Exit 1 (and the error on stderr) if
the daemon cannot be reached or refuses.
"""

import json
import mmap
import os
import socket
import sys


def stale(device: str, chunk: int = 4096) -> int:
    """A diagnosis for demo.sh: the chunks of DEVICE where a read through the page cache differs
    from an O_DIRECT read (what the device holds). Prints the count and the first ones."""
    step = 1 << 20
    buf = mmap.mmap(-1, step)  # page-aligned, as O_DIRECT wants
    cached = os.open(device, os.O_RDONLY)
    direct = os.open(device, os.O_RDONLY | os.O_DIRECT)
    differing = []
    try:
        size = os.lseek(cached, 0, os.SEEK_END)
        for off in range(0, size, step):
            n = min(step, size - off)
            a = os.pread(cached, n, off)
            got = os.preadv(direct, [memoryview(buf)[:n]], off)
            b = buf[:got]
            if a != b:
                differing += [(off + i) // chunk for i in range(0, n, chunk)
                              if a[i:i + chunk] != b[i:i + chunk]]
    finally:
        os.close(cached)
        os.close(direct)
    first = " ".join(str(c) for c in differing[:20])
    print(f"{device}: {len(differing)} chunks of {chunk} bytes differ between the page cache "
          f"and the device" + (f" (the first: {first})" if differing else ""))
    return 1 if differing else 0


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--stale":
        return stale(sys.argv[2], *(int(x) for x in sys.argv[3:4]))
    if len(sys.argv) != 2:
        print("usage: demo.py CONTROL-SOCKET | demo.py --stale DEVICE [CHUNK-SIZE]", file=sys.stderr)
        return 2
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(sys.argv[1])
            s.sendall(b'{"cmd": "status"}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(1 << 16)
                if not data:
                    break
                buf += data
        reply = json.loads(buf)
    except (OSError, ValueError) as e:
        print(f"demo.py: {sys.argv[1]}: {e}", file=sys.stderr)
        return 1
    if reply.get("ok") is not True:
        print(f"demo.py: the daemon refused: {reply.get('error')}", file=sys.stderr)
        return 1
    json.dump(reply.get("result"), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
