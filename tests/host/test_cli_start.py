"""What the CLI imports to start: only what the command at hand uses.

`repctl status` runs every few seconds under a cluster manager (the OCF agent), and in the
emulated test VM every imported module costs; so importing the CLI and asking the daemon for
its status must not load the metadata code (cffi, pycparser), the daemon, or (with --json)
rich. Each case runs the CLI in a fresh Python process, against a real control socket, and
reads the process's sys.modules as it exits. Timing is bench/cli_bench.py's, not a test's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from repctl.control import ControlServer

#: Modules no short command needs: the metadata code and its C parser, the daemon's service,
#: the metrics endpoint and its library, the compression codecs (a link that uses one loads it).
NEVER = {"cffi", "pycparser", "repctl.uapi", "repctl.metadata", "prometheus_client",
         "zstandard", "lz4",
         *(f"repctl.daemon.{m}" for m in ("events", "stats", "base", "verify", "link", "source",
                                            "target", "failover", "metrics", "service"))}

#: The configuration parser; a command that asks the daemon needs it for the socket's path.
YAML = {"yaml"}

#: What draws tables and help screens.
RICH = {"rich"}

STATUS: dict[str, Any] = {
    "node": "alpha",
    "resources": [{
        "name": "r0", "role": "primary", "disk": "UpToDate",
        "targets": [{"name": "beta", "mode": "sync", "state": "streaming",
                     "connection": "connected", "out_of_sync_bytes": 0}],
    }],
}

#: Runs the CLI as the `repctl` script does, and writes sys.modules to argv[1] at exit.
DRIVER = textwrap.dedent("""\
    import atexit, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even in a background job
    out, sys.argv = sys.argv[1], ["repctl", *sys.argv[2:]]
    def dump():
        with open(out, "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
    atexit.register(dump)
    from repctl.cli import app
    app()
""")


class StatusOnly:
    def status(self) -> dict[str, Any]:
        return STATUS


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="repctl-", dir="/tmp"))  # short: an AF_UNIX path
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def config(tmp_path: Path, sockdir: Path) -> Iterator[Path]:
    sock = sockdir / "repctl.sock"
    path = tmp_path / "repctl.yaml"
    path.write_text(textwrap.dedent(f"""\
        global: {{control_socket: {sock}, state_dir: {tmp_path}/state,
                  secret_file: {tmp_path}/secret}}
        resources:
          r0:
            port: 7789
            source: alpha
            nodes:
              alpha: {{address: 10.0.0.1, device: {tmp_path}/d.img,
                       metadata: {tmp_path}/md.img}}
              beta: {{address: 10.0.0.2, device: {tmp_path}/d.img}}
            targets: {{beta: {{mode: sync}}}}
    """))
    server = ControlServer(sock, StatusOnly())  # type: ignore[arg-type]  # status only
    server.start()
    yield path
    server.stop()


def modules_of(tmp_path: Path, *argv: str, config: Path | None = None) -> tuple[set[str], str]:
    """The modules loaded by ``repctl ARGV`` when it exits, and what it printed."""
    out = tmp_path / "modules"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if config is not None:
        env["REPCTL_CONFIG"] = str(config)
    done = subprocess.run([sys.executable, "-c", DRIVER, str(out), *argv], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return set(out.read_text().split()), done.stdout


def modules_after_ctrl_c(tmp_path: Path, *argv: str, config: Path) -> tuple[set[str], str, str]:
    """As `modules_of`, for a command that runs until Ctrl-C: SIGINT once it printed two lines.
    Returns the modules, stdout and stderr; the command must have exited 0."""
    out = tmp_path / "modules"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["REPCTL_CONFIG"] = str(config)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(out), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline() + proc.stdout.readline()  # blocks until it printed
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    return set(out.read_text().split()), first + rest, err


def loaded(modules: set[str], forbidden: set[str]) -> list[str]:
    """The modules of `modules` that are, or are inside, one of `forbidden`."""
    return sorted(m for m in modules if m in forbidden or m.split(".")[0] in forbidden)


def test_importing_the_cli_loads_nothing_heavy(tmp_path: Path) -> None:
    script = "import sys, repctl.cli; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    modules = set(done.stdout.split())
    assert "repctl.cli" in modules
    assert loaded(modules, NEVER | YAML | RICH) == []


def test_status_json_loads_neither_rich_nor_the_daemon(tmp_path: Path, config: Path) -> None:
    modules, printed = modules_of(tmp_path, "status", "--json", config=config)
    assert json.loads(printed) == STATUS
    assert loaded(modules, NEVER | RICH) == []
    assert "repctl.control" in modules and "yaml" in modules  # it did read the file


def test_status_table_loads_rich_but_not_the_daemon(tmp_path: Path, config: Path) -> None:
    modules, printed = modules_of(tmp_path, "status", config=config)
    assert "beta" in printed and "streaming" in printed
    assert loaded(modules, NEVER) == []
    assert "rich.table" in modules


def test_status_table_loads_no_live_display(tmp_path: Path, config: Path) -> None:
    modules, _ = modules_of(tmp_path, "status", config=config)
    assert loaded(modules, {"rich.live", "rich.progress_bar"}) == []


def test_status_watch_json_loads_no_rich_and_stops_on_ctrl_c(
    tmp_path: Path, config: Path
) -> None:
    modules, printed, err = modules_after_ctrl_c(tmp_path, "status", "--watch", "--json",
                                                 "--interval", "0.2", config=config)
    docs = [json.loads(line) for line in printed.splitlines()]
    assert len(docs) >= 2 and all(d == STATUS for d in docs)
    assert err == ""
    assert loaded(modules, NEVER | RICH) == []


def test_status_watch_in_a_pipe_stops_on_ctrl_c(tmp_path: Path, config: Path) -> None:
    modules, printed, err = modules_after_ctrl_c(tmp_path, "status", "--watch", "-i", "0.2",
                                                 config=config)
    assert "\x1b" not in printed and "repctl on alpha" in printed and err == ""
    assert loaded(modules, NEVER | {"rich.live"}) == []  # no live display without a terminal


def test_help_reads_no_configuration(tmp_path: Path) -> None:
    modules, printed = modules_of(tmp_path, "--help")
    assert "status" in printed
    assert loaded(modules, NEVER | YAML) == []


def test_the_forbidden_modules_exist() -> None:
    """The names above are real: a renamed module would make the tests pass vacuously."""
    pkg = Path(__file__).resolve().parents[2] / "pyctl" / "repctl"
    for name in sorted(NEVER):
        if name.startswith("repctl."):
            assert (pkg / (name.removeprefix("repctl.").replace(".", "/") + ".py")).exists(), name
    script = "import cffi, pycparser, yaml, rich, zstandard, lz4.block"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
