"""The Pacemaker resource agent ocf/repctl, run as Pacemaker runs it, against a fake repctl.

The fake `repctl` (written into tmp_path) keeps a JSON state file: whether the daemon runs, and
per resource whether it is up, its role and disk state, and what it should refuse. A fake
`crm_master` on PATH records the promotion scores the agent sets. Every test runs twice: with
the OCF shell functions of resource-agents (when installed) and with the agent's own fallbacks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "ocf" / "repctl"
SHELLFUNCS = Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs")

OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_ARGS, OCF_ERR_UNIMPLEMENTED = 0, 1, 2, 3
OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING = 5, 6, 7
OCF_RUNNING_PROMOTED, OCF_FAILED_PROMOTED = 8, 9

CONFIG = """\
resources:
  r0:
    port: 7789
    source: alpha
    nodes:
      alpha: {address: 10.0.0.1, device: /dev/vg0/data, metadata: /dev/vg0/data-md}
      beta: {address: 10.0.0.2, device: /dev/vg0/data, metadata: /dev/vg0/data-md}
    targets:
      beta: {mode: sync}
"""

# The fake: answers like repctl (docs/cli.md) from state.json next to it, and logs its calls.
FAKE_REPCTL = r'''
import json, sys
from pathlib import Path

here = Path(__file__).resolve().parent
state_file = here / "state.json"
with open(here / "calls.log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\n")


def fail(text, code=1):
    print(f"repctl: error: {text}", file=sys.stderr)
    sys.exit(code)


args = sys.argv[1:]
if args[:1] != ["-c"] or len(args) < 3:
    fail("the fake wants -c CONFIG COMMAND", 2)
config, cmd, rest = args[1], args[2], args[3:]
if not Path(config).is_file():
    fail(f"{config}: a readable configuration file: No such file or directory")
st = json.loads(state_file.read_text())
if not st["daemon"]:
    fail("cannot reach the repctl daemon at /run/repctl/repctl.sock: no such socket "
         "(is it running? systemctl status repctl)")
if cmd == "status" and rest == ["--json"]:
    out = []
    for name, r in st["resources"].items():
        if r["up"]:
            e = {"name": name, "role": r["role"], "disk": r["disk"], "state": "streaming",
                 "last_error": None, "targets": []}
            if r["failed"]:
                e.update(state="failed", last_error=r["failed"])
            out.append(e)
        elif r["up_failed"]:
            out.append({"name": name, "role": r["role"], "state": "failed",
                        "last_error": r["up_failed"], "targets": []})
    print(json.dumps({"node": "alpha", "resources": out}))
    sys.exit(0)
if cmd not in ("up", "down", "promote", "demote") or len(rest) != 1:
    fail(f"the fake does not know {args}", 2)
name = rest[0]
if name not in st["resources"]:
    fail(f"unknown resource {name!r}")
r = st["resources"][name]
if cmd == "up":
    if r["up"]:
        print(f"{name} is already up")
    elif r["refuse_up"]:
        r["up_failed"] = r["refuse_up"]
        state_file.write_text(json.dumps(st))
        fail(r["refuse_up"])
    else:
        r.update(up=True, up_failed=None)
        print(f"{name} is up as {r['role']}")
elif not r["up"]:
    fail(f"resource {name} is down on alpha: `repctl up {name}`")
elif cmd == "down":
    r["up"] = False
    print(f"{name} is down")
elif cmd == "promote":
    if r["role"] == "primary":
        fail(f"{name}: this node (alpha) is already the primary")
    if r["refuse_promote"]:
        fail(f"{name}: cannot promote alpha: {r['refuse_promote']}")
    if r["disk"] not in ("UpToDate", "Consistent"):
        fail(f"{name}: cannot promote alpha: its data is {r['disk']}")
    r.update(role="primary", disk="UpToDate")
    print(f"{name}: alpha is the primary")
else:  # demote
    if r["role"] != "primary":
        fail(f"resource {name}: alpha is a secondary; run this on the primary")
    if r["refuse_demote"]:
        fail(f"{name}: cannot demote alpha: {r['refuse_demote']}")
    r.update(role="secondary", failed=None)  # the daemon replaces the primary's machinery
    print(f"{name}: alpha is a secondary")
state_file.write_text(json.dumps(st))
'''

# Records its arguments, as crm_master does nothing else that the agent relies on.
FAKE_CRM_MASTER = """#!/bin/sh
echo "$OCF_RESOURCE_INSTANCE $*" >> "$(dirname "$0")/crm.log"
"""


class Node:
    """One node as the agent sees it: the fake repctl, its state, the fake crm_master."""

    def __init__(self, tmp: Path, shellfuncs: bool) -> None:
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.repctl = self.bin / "repctl"
        self.repctl.write_text(f"#!{sys.executable}\n{FAKE_REPCTL}")
        self.repctl.chmod(0o755)
        crm = self.bin / "crm_master"
        crm.write_text(FAKE_CRM_MASTER)
        crm.chmod(0o755)
        self.config = tmp / "repctl.yaml"
        self.config.write_text(CONFIG)
        self.dm_dir = tmp / "dm"
        self.dm_dir.mkdir()
        self.state_file = self.bin / "state.json"
        self.set(daemon=True)
        self.env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "OCF_RESOURCE_INSTANCE": "r0:0",
            "OCF_RESKEY_resource": "r0",
            "OCF_RESKEY_config": str(self.config),
            "OCF_RESKEY_repctl": str(self.repctl),
            "REPCTL_DM_DIR": str(self.dm_dir),
        }
        if shellfuncs:
            self.env["OCF_ROOT"] = "/usr/lib/ocf"
        else:
            self.env["OCF_FUNCTIONS_DIR"] = str(tmp / "no-ocf-shellfuncs")

    def set(self, daemon: bool = True, **r0: Any) -> None:
        """Resource r0: down, a secondary UpToDate, unless told otherwise."""
        res = {"up": False, "role": "secondary", "disk": "UpToDate", "failed": None,
               "up_failed": None, "refuse_up": None, "refuse_promote": None,
               "refuse_demote": None}
        res.update(r0)
        self.state_file.write_text(json.dumps({"daemon": daemon, "resources": {"r0": res}}))
        for log in ("calls.log", "crm.log"):
            (self.bin / log).unlink(missing_ok=True)

    def r0(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())["resources"]["r0"]

    def calls(self) -> list[list[str]]:
        """The repctl commands run, without `-c CONFIG` (checked to be this config)."""
        log = self.bin / "calls.log"
        lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        for argv in lines:
            assert argv[:2] == ["-c", str(self.config)], argv
        return [argv[2:] for argv in lines]

    def changes(self) -> list[list[str]]:
        """The repctl commands run that are not `status`."""
        return [c for c in self.calls() if c[0] != "status"]

    def scores(self) -> list[str]:
        """The crm_master calls: 'INSTANCE ARGS...' each."""
        log = self.bin / "crm.log"
        return log.read_text().splitlines() if log.exists() else []

    def run(self, action: str | None, interval: int = 10000, **env: str | None
            ) -> subprocess.CompletedProcess[str]:
        full = {**self.env, "OCF_RESKEY_CRM_meta_interval": str(interval)}
        for k, v in env.items():
            if v is None:
                full.pop(k, None)
            else:
                full[k] = v
        argv = [str(AGENT)] + ([action] if action else [])
        return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=60,
                              check=False)

    def rc(self, action: str, **kw: Any) -> int:
        return self.run(action, **kw).returncode


@pytest.fixture(params=["fallback", "ocf-shellfuncs"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Node:
    if request.param == "ocf-shellfuncs" and not SHELLFUNCS.exists():
        pytest.skip(f"{SHELLFUNCS} is not installed (Debian package resource-agents)")
    return Node(tmp_path, shellfuncs=request.param == "ocf-shellfuncs")


SET = "r0:0 -Q -l reboot -v"
DELETE = "r0:0 -Q -l reboot -D"


# -- monitor ---------------------------------------------------------------------------------


def test_monitor_not_running(node: Node) -> None:
    assert node.rc("monitor") == OCF_NOT_RUNNING
    assert node.rc("monitor", interval=0) == OCF_NOT_RUNNING  # the probe
    assert node.changes() == []


def test_monitor_daemon_not_running(node: Node) -> None:
    node.set(daemon=False)
    assert node.rc("monitor") == OCF_NOT_RUNNING


def test_monitor_daemon_not_running_but_device_exists(node: Node) -> None:
    """A primary's device without its daemon replicates nothing: a failed promoted instance."""
    node.set(daemon=False)
    (node.dm_dir / "r0").touch()
    p = node.run("monitor")
    assert p.returncode == OCF_FAILED_PROMOTED
    assert "ocf-exit-reason:" in p.stderr and "daemon is not running" in p.stderr


def test_monitor_secondary_is_unpromoted(node: Node) -> None:
    node.set(up=True)
    assert node.rc("monitor") == OCF_SUCCESS
    assert node.scores() == [f"{SET} 10000"]
    assert node.changes() == []


def test_monitor_primary_is_promoted(node: Node) -> None:
    node.set(up=True, role="primary")
    assert node.rc("monitor") == OCF_RUNNING_PROMOTED
    assert node.scores() == [f"{SET} 10000"]


@pytest.mark.parametrize(("disk", "score"), [
    ("UpToDate", f"{SET} 10000"),
    ("Consistent", f"{SET} 100"),
    ("Inconsistent", DELETE),
    ("Outdated", DELETE),
    ("Diskless", DELETE),
])
def test_promotion_score_follows_the_disk_state(node: Node, disk: str, score: str) -> None:
    node.set(up=True, disk=disk)
    assert node.rc("monitor") == OCF_SUCCESS
    assert node.scores() == [score]


def test_promotion_score_with_crm_attribute(node: Node) -> None:
    """Without crm_master (deprecated in Pacemaker 2.1), crm_attribute --promotion does it."""
    if shutil.which("crm_master", path="/usr/sbin:/sbin:/usr/bin:/bin"):
        pytest.skip("a real crm_master is installed (ocf-shellfuncs puts it in PATH)")
    crm = node.bin / "crm_master"
    crm.rename(node.bin / "crm_attribute")
    node.set(up=True, disk="Consistent")
    assert node.rc("monitor") == OCF_SUCCESS
    assert node.scores() == ["r0:0 --promotion -Q -l reboot -v 100"]


def test_no_crm_tools_is_only_a_warning(node: Node) -> None:
    """Outside a cluster (ocf-tester on a bare host) the agent works, and says what it skips."""
    system = "/usr/sbin:/sbin:/usr/bin:/bin"  # ocf-shellfuncs appends these to PATH
    if any(shutil.which(t, path=system) for t in ("crm_master", "crm_attribute")):
        pytest.skip("Pacemaker's command line tools are installed here")
    (node.bin / "crm_master").unlink()
    node.set(up=True, role="primary")
    p = node.run("monitor")
    assert p.returncode == OCF_RUNNING_PROMOTED
    assert "cannot set the promotion score" in p.stderr


def test_monitor_failed_primary(node: Node) -> None:
    node.set(up=True, role="primary", failed="internal error: ring read failed")
    p = node.run("monitor")
    assert p.returncode == OCF_FAILED_PROMOTED
    assert "ring read failed" in p.stderr
    assert node.scores() == [DELETE]


def test_monitor_failed_secondary(node: Node) -> None:
    node.set(up=True, failed="internal error: short write")
    assert node.rc("monitor") == OCF_ERR_GENERIC
    assert node.scores() == [DELETE]


def test_monitor_resource_that_failed_to_come_up_is_not_running(node: Node) -> None:
    """Nothing of it runs: Pacemaker's start then gets repctl up's refusal as its reason."""
    node.set(up_failed="corrupt state file /var/lib/repctl/r0/role.json")
    p = node.run("monitor")
    assert p.returncode == OCF_NOT_RUNNING
    assert "role.json" in p.stderr


def test_probe_without_repctl_installed_is_not_running(node: Node) -> None:
    missing = str(node.tmp / "nowhere" / "repctl")
    assert node.rc("monitor", interval=0, OCF_RESKEY_repctl=missing) == OCF_NOT_RUNNING
    assert node.rc("monitor", OCF_RESKEY_repctl=missing) == OCF_ERR_INSTALLED


# -- start and stop --------------------------------------------------------------------------


def test_start_from_stopped_leaves_it_unpromoted(node: Node) -> None:
    assert node.rc("start") == OCF_SUCCESS
    assert node.r0()["up"] and node.r0()["role"] == "secondary"
    assert node.changes() == [["up", "r0"]]
    assert node.scores() == [f"{SET} 10000"]
    assert node.rc("monitor") == OCF_SUCCESS


def test_start_demotes_what_comes_up_primary(node: Node) -> None:
    node.set(role="primary")
    assert node.rc("start") == OCF_SUCCESS
    assert node.r0()["role"] == "secondary"
    assert node.changes() == [["up", "r0"], ["demote", "r0"]]


def test_start_fails_when_it_comes_up_primary_and_cannot_be_demoted(node: Node) -> None:
    node.set(role="primary", refuse_demote="/dev/mapper/r0 is in use (mounted on /srv)")
    p = node.run("start")
    assert p.returncode == OCF_ERR_GENERIC
    assert "mounted on /srv" in p.stderr


def test_start_when_running_succeeds(node: Node) -> None:
    node.set(up=True)
    assert node.rc("start") == OCF_SUCCESS
    assert node.changes() == []


def test_start_refused_by_repctl_up(node: Node) -> None:
    node.set(refuse_up="r0: split brain with beta: stays down")
    p = node.run("start")
    assert p.returncode == OCF_ERR_GENERIC
    assert "ocf-exit-reason:" in p.stderr and "split brain with beta" in p.stderr
    assert node.rc("monitor") == OCF_NOT_RUNNING


def test_start_without_the_daemon(node: Node) -> None:
    node.set(daemon=False)
    p = node.run("start")
    assert p.returncode == OCF_ERR_GENERIC
    assert "daemon is not running" in p.stderr


def test_stop_when_stopped_succeeds(node: Node) -> None:
    assert node.rc("stop") == OCF_SUCCESS
    assert node.changes() == []
    assert node.scores() == [DELETE]


def test_stop_secondary(node: Node) -> None:
    node.set(up=True)
    assert node.rc("stop") == OCF_SUCCESS
    assert not node.r0()["up"]
    assert node.changes() == [["down", "r0"]]
    assert node.rc("monitor") == OCF_NOT_RUNNING


def test_stop_primary_demotes_first(node: Node) -> None:
    node.set(up=True, role="primary")
    assert node.rc("stop") == OCF_SUCCESS
    assert node.changes() == [["demote", "r0"], ["down", "r0"]]
    assert not node.r0()["up"] and node.r0()["role"] == "secondary"


def test_stop_fails_when_the_primary_cannot_be_demoted(node: Node) -> None:
    node.set(up=True, role="primary", refuse_demote="/dev/mapper/r0 is in use (psql[4242])")
    p = node.run("stop")
    assert p.returncode == OCF_ERR_GENERIC
    assert "psql[4242]" in p.stderr
    assert node.r0()["up"] and node.r0()["role"] == "primary"
    assert node.changes() == [["demote", "r0"]]


def test_stop_without_the_daemon(node: Node) -> None:
    node.set(daemon=False)
    assert node.rc("stop") == OCF_SUCCESS
    (node.dm_dir / "r0").touch()
    assert node.rc("stop") == OCF_ERR_GENERIC


def test_stop_resource_that_failed_to_come_up(node: Node) -> None:
    node.set(up_failed="corrupt state file")
    assert node.rc("stop") == OCF_SUCCESS
    assert node.changes() == []


def test_stop_when_repctl_is_not_installed(node: Node) -> None:
    missing = str(node.tmp / "nowhere" / "repctl")
    assert node.rc("stop", OCF_RESKEY_repctl=missing) == OCF_SUCCESS
    (node.dm_dir / "r0").touch()
    assert node.rc("stop", OCF_RESKEY_repctl=missing) == OCF_ERR_INSTALLED


# -- promote and demote ----------------------------------------------------------------------


def test_promote(node: Node) -> None:
    node.set(up=True)
    assert node.rc("promote") == OCF_SUCCESS
    assert node.r0()["role"] == "primary"
    assert node.changes() == [["promote", "r0"]]
    assert node.scores() == [f"{SET} 10000"]
    assert node.rc("monitor") == OCF_RUNNING_PROMOTED


def test_promote_refused_changes_nothing(node: Node) -> None:
    node.set(up=True, refuse_promote="beta is reachable and primary; run `repctl demote r0` "
             "on beta first")
    before = node.r0()
    p = node.run("promote")
    assert p.returncode == OCF_ERR_GENERIC
    assert "beta is reachable and primary" in p.stderr
    assert node.r0() == before
    assert node.changes() == [["promote", "r0"]]  # no --force, no retry, nothing else
    assert node.rc("monitor") == OCF_SUCCESS


def test_promote_inconsistent_is_refused(node: Node) -> None:
    node.set(up=True, disk="Inconsistent")
    assert node.rc("promote") == OCF_ERR_GENERIC
    assert node.r0()["role"] == "secondary"
    assert all("--force" not in c for c in node.calls())


def test_promote_promoted_succeeds(node: Node) -> None:
    node.set(up=True, role="primary")
    assert node.rc("promote") == OCF_SUCCESS
    assert node.changes() == []


def test_promote_stopped(node: Node) -> None:
    assert node.rc("promote") == OCF_NOT_RUNNING
    assert node.changes() == []


def test_promote_failed_is_refused(node: Node) -> None:
    node.set(up=True, failed="internal error")
    assert node.rc("promote") == OCF_ERR_GENERIC
    assert node.changes() == []


def test_demote(node: Node) -> None:
    node.set(up=True, role="primary")
    assert node.rc("demote") == OCF_SUCCESS
    assert node.r0()["role"] == "secondary" and node.r0()["up"]
    assert node.changes() == [["demote", "r0"]]
    assert node.rc("monitor") == OCF_SUCCESS


def test_demote_unpromoted_succeeds(node: Node) -> None:
    node.set(up=True)
    assert node.rc("demote") == OCF_SUCCESS
    assert node.changes() == []


def test_demote_refused(node: Node) -> None:
    node.set(up=True, role="primary", refuse_demote="/dev/mapper/r0 is in use (mounted on /x)")
    p = node.run("demote")
    assert p.returncode == OCF_ERR_GENERIC
    assert "mounted on /x" in p.stderr
    assert node.r0()["role"] == "primary"
    assert node.rc("monitor") == OCF_RUNNING_PROMOTED


def test_demote_stopped(node: Node) -> None:
    assert node.rc("demote") == OCF_NOT_RUNNING


def test_failed_primary_is_demoted_on_recovery(node: Node) -> None:
    node.set(up=True, role="primary", failed="internal error")
    assert node.rc("demote") == OCF_SUCCESS
    assert node.changes() == [["demote", "r0"]]


# -- notify, usage ---------------------------------------------------------------------------


def test_notify_succeeds_and_refreshes_the_score(node: Node) -> None:
    node.set(up=True, disk="Consistent")
    env = {"OCF_RESKEY_CRM_meta_notify_type": "post",
           "OCF_RESKEY_CRM_meta_notify_operation": "promote"}
    assert node.rc("notify", **env) == OCF_SUCCESS
    assert node.scores() == [f"{SET} 100"]
    node.set(daemon=False)
    assert node.rc("notify", **env) == OCF_SUCCESS
    assert node.scores() == []
    env["OCF_RESKEY_CRM_meta_notify_type"] = "pre"
    assert node.rc("notify", **env) == OCF_SUCCESS


def test_usage_and_unknown_actions(node: Node) -> None:
    for action in ("usage", "help"):
        p = node.run(action)
        assert p.returncode == OCF_SUCCESS and "validate-all" in p.stdout
    assert node.rc("migrate_to") == OCF_ERR_UNIMPLEMENTED
    assert node.rc("reload") == OCF_ERR_UNIMPLEMENTED
    p = node.run(None)
    assert p.returncode == OCF_ERR_ARGS and "usage:" in p.stderr


# -- validate-all ----------------------------------------------------------------------------


def test_validate_all(node: Node) -> None:
    p = node.run("validate-all")
    assert p.returncode == OCF_SUCCESS, p.stderr
    assert node.calls() == []  # checks the configuration, asks no daemon


def test_validate_missing_resource_parameter(node: Node) -> None:
    p = node.run("validate-all", OCF_RESKEY_resource=None)
    assert p.returncode == OCF_ERR_CONFIGURED
    assert "'resource' is required" in p.stderr
    assert node.rc("start", OCF_RESKEY_resource=None) == OCF_ERR_CONFIGURED
    assert node.rc("monitor", OCF_RESKEY_resource="") == OCF_ERR_CONFIGURED


def test_validate_bad_resource_name(node: Node) -> None:
    assert node.rc("validate-all", OCF_RESKEY_resource="r0;reboot") == OCF_ERR_CONFIGURED


def test_validate_resource_not_in_config(node: Node) -> None:
    p = node.run("validate-all", OCF_RESKEY_resource="r9")
    assert p.returncode == OCF_ERR_CONFIGURED
    assert "'r9'" in p.stderr and "r0" in p.stderr
    assert node.rc("start", OCF_RESKEY_resource="r9") == OCF_ERR_CONFIGURED
    assert node.changes() == []


def test_validate_invalid_config(node: Node) -> None:
    node.config.write_text(CONFIG.replace("port:", "prot:"))
    p = node.run("validate-all")
    assert p.returncode == OCF_ERR_CONFIGURED
    assert "prot" in p.stderr


def test_validate_unknown_binary(node: Node) -> None:
    p = node.run("validate-all", OCF_RESKEY_repctl=str(node.tmp / "nowhere" / "repctl"))
    assert p.returncode == OCF_ERR_INSTALLED
    assert "not installed" in p.stderr
    assert node.rc("validate-all", OCF_RESKEY_repctl="no-such-repctl") == OCF_ERR_INSTALLED
    assert node.rc("start", OCF_RESKEY_repctl="no-such-repctl") == OCF_ERR_INSTALLED


def test_validate_unreadable_config(node: Node) -> None:
    p = node.run("validate-all", OCF_RESKEY_config=str(node.tmp / "missing.yaml"))
    assert p.returncode == OCF_ERR_INSTALLED
    assert "missing.yaml" in p.stderr


def test_repctl_found_in_path_by_default(node: Node) -> None:
    node.set(up=True, role="primary")
    assert node.rc("monitor", OCF_RESKEY_repctl=None) == OCF_RUNNING_PROMOTED


def test_repctl_that_is_no_python_script(node: Node) -> None:
    """A wrapper script: the agent parses with python3 from PATH and cannot load the config
    with repctl's code; validate-all says so and does not fail for it."""
    if subprocess.run(["/usr/bin/python3", "-c", "import repctl"],
                      capture_output=True, check=False).returncode == 0:
        pytest.skip("/usr/bin/python3 has repctl installed: no interpreter without it here")
    real = node.bin / "fake.py"
    node.repctl.rename(real)
    node.repctl.write_text(f'#!/bin/sh\nexec {sys.executable} {real} "$@"\n')
    node.repctl.chmod(0o755)
    node.set(up=True, role="primary")
    assert node.rc("monitor") == OCF_RUNNING_PROMOTED
    p = node.run("validate-all", OCF_RESKEY_resource="r9")
    assert p.returncode == OCF_SUCCESS
    assert "could not check" in p.stderr and "cannot import repctl" in p.stderr


# -- meta-data -------------------------------------------------------------------------------


def _meta_data() -> ET.Element:
    p = subprocess.run([str(AGENT), "meta-data"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"}, timeout=30, check=False)
    assert p.returncode == OCF_SUCCESS, p.stderr
    return ET.fromstring(p.stdout)


def test_meta_data_is_ocf_1_1() -> None:
    root = _meta_data()
    assert root.tag == "resource-agent" and root.get("name") == "repctl"
    assert root.findtext("version") == "1.1"
    assert root.findtext("shortdesc") and root.findtext("longdesc")
    params = {p.get("name"): p for p in root.iter("parameter")}
    assert set(params) == {"resource", "config", "repctl"}
    for p in params.values():
        assert p.findtext("longdesc", "").strip() and p.findtext("shortdesc", "").strip()
        assert p.find("content") is not None
    assert params["resource"].get("required") == "1" and params["resource"].get("unique") == "1"
    defaults = {n: p.find("content") for n, p in params.items()}
    assert [d.get("default") if d is not None else None for d in defaults.values()] == [
        None, "/etc/repctl/repctl.yaml", "repctl"]
    actions = {(a.get("name"), a.get("role")): a for a in root.iter("action")}
    for name in ("start", "stop", "promote", "demote", "notify", "validate-all", "meta-data"):
        assert actions[(name, None)].get("timeout")
    for role in ("Promoted", "Unpromoted"):
        assert actions[("monitor", role)].get("interval")
    intervals = [actions[("monitor", r)].get("interval") for r in ("Promoted", "Unpromoted")]
    assert len(set(intervals)) == 2  # Pacemaker needs one interval per role


def test_meta_data_documents_every_parameter_read() -> None:
    read = set(re.findall(r"OCF_RESKEY_(\w+)", AGENT.read_text()))
    read = {k for k in read if not k.startswith("CRM_meta_") and not k.endswith("_default")}
    assert read == {p.get("name") for p in _meta_data().iter("parameter")}


def test_meta_data_valid_against_the_ocf_dtd() -> None:
    dtd_dir = Path("/usr/share/resource-agents")
    if shutil.which("xmllint") is None or not (dtd_dir / "ra-api-1.dtd").exists():
        pytest.skip("xmllint or ra-api-1.dtd missing (Debian packages libxml2-utils, "
                    "resource-agents)")
    md = subprocess.run([str(AGENT), "meta-data"], capture_output=True, text=True, check=True)
    p = subprocess.run(["xmllint", "--noout", "--valid", "-"], input=md.stdout, cwd=dtd_dir,
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr


def test_agent_is_posix_sh_and_executable() -> None:
    assert AGENT.read_text().startswith("#!/bin/sh\n")
    assert AGENT.stat().st_mode & 0o755 == 0o755
    for shell in ("dash", "bash"):
        if shutil.which(shell):
            subprocess.run([shell, "-n", str(AGENT)], check=True)


# -- ocf-tester ------------------------------------------------------------------------------


@pytest.fixture
def public_agent() -> Iterator[Path]:
    """A copy of the agent that user nobody can run (ocf-tester checks that as root)."""
    d = Path(tempfile.mkdtemp(prefix="repctl-ocf-"))
    try:
        d.chmod(0o755)
        agent = d / "repctl"
        shutil.copy(AGENT, agent)
        agent.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        yield agent
    finally:
        shutil.rmtree(d)


def test_ocf_tester(tmp_path: Path, public_agent: Path) -> None:
    tester = shutil.which("ocf-tester") or shutil.which("ocf-tester", path="/usr/sbin:/sbin")
    if tester is None:
        pytest.skip("ocf-tester is not installed (Debian package resource-agents)")
    if shutil.which("xmllint") is None:
        pytest.skip("ocf-tester validates the meta-data with xmllint (Debian package "
                    "libxml2-utils), which is not installed")
    node = Node(tmp_path, shellfuncs=True)
    env = {k: v for k, v in node.env.items() if not k.startswith("OCF_RESKEY_")}
    env.pop("OCF_RESOURCE_INSTANCE")
    p = subprocess.run(
        [tester, "-v", "-n", "r0", "-o", "resource=r0", "-o", f"config={node.config}",
         "-o", f"repctl={node.repctl}", str(public_agent)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "passed all tests" in p.stdout
    # it went through the actions against the fake, and left r0 stopped
    done = {c[0] for c in node.changes()}
    assert done == {"up", "promote", "demote", "down"}, node.changes()
    assert not node.r0()["up"]
    if os.geteuid() != 0:
        assert "Can't check agent's permissions" in p.stdout


# -- the real repctl -------------------------------------------------------------------------


def test_against_the_real_daemon(tmp_path: Path) -> None:
    """The real CLI and daemon, on a node that is an image-file target (no kernel module
    needed): what the agent reads of the real status document, and a real refusal."""
    repctl = Path(sys.executable).with_name("repctl")
    if not repctl.exists():
        pytest.skip(f"no repctl next to {sys.executable} (make venv)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    secret.chmod(0o600)
    (tmp_path / "r0.img").write_bytes(b"\0" * (1 << 20))
    config = tmp_path / "real.yaml"
    config.write_text(f"""\
global:
  control_socket: {tmp_path}/repctl.sock
  state_dir: {tmp_path}/state
  secret_file: {secret}
resources:
  r0:
    port: {port}
    source: beta
    nodes:
      alpha: {{address: 127.0.0.1, device: {tmp_path}/r0.img}}
      beta: {{address: 127.0.0.2, device: /dev/vg0/data, metadata: /dev/vg0/data-md}}
    targets:
      alpha: {{mode: sync}}
""")
    node = Node(tmp_path, shellfuncs=False)
    node.env.update(OCF_RESKEY_repctl=str(repctl), OCF_RESKEY_config=str(config))
    daemon = subprocess.Popen([repctl, "-c", config, "daemon", "--node", "alpha"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if (tmp_path / "repctl.sock").exists():
                break
            assert daemon.poll() is None, "repctl daemon exited"
            time.sleep(0.05)
        # alpha comes up by itself, a Consistent secondary waiting for its primary
        assert node.rc("monitor") == OCF_SUCCESS
        assert node.scores() == [f"{SET} 100"]
        assert node.rc("stop") == OCF_SUCCESS
        assert node.rc("monitor") == OCF_NOT_RUNNING
        assert node.rc("stop") == OCF_SUCCESS
        assert node.rc("start") == OCF_SUCCESS
        p = node.run("promote")  # refused: alpha has no metadata device
        assert p.returncode == OCF_ERR_GENERIC
        assert "no metadata device" in p.stderr
        assert node.rc("monitor") == OCF_SUCCESS
        assert node.rc("validate-all", OCF_RESKEY_resource="r1") == OCF_ERR_CONFIGURED
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
