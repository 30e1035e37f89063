"""The daemon package's layering (issue 11): each module imports only those listed before it in
repctl/daemon/__init__.py, nothing outside the package imports it but the CLI's `daemon` verb,
and every state the daemon reports is a member of an enum of repctl.daemon.state."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from repctl.daemon import state as S

PKG = Path(__file__).resolve().parents[2] / "pyctl" / "repctl"
ORDER = ["state", "events", "stats", "base", "verify", "resyncrate", "scheduler", "link", "source",
         "target", "failover", "metrics", "service"]


def imports_of(path: Path) -> set[str]:
    """Every repctl module `path` imports, at run time or for typing."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("repctl"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("repctl"))
    return found


def runtime_imports_of(path: Path) -> set[str]:
    """The repctl modules `path` imports outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("repctl"):
            found.add(node.module)
    return found


def test_the_listed_modules_are_the_package() -> None:
    assert {p.stem for p in (PKG / "daemon").glob("*.py")} == {*ORDER, "__init__"}
    doc = (PKG / "daemon" / "__init__.py").read_text()
    assert [m for m in ORDER if f"* `{m}`" in doc] == ORDER


@pytest.mark.parametrize("module", ORDER)
def test_a_module_imports_only_those_above_it_at_run_time(module: str) -> None:
    mine = runtime_imports_of(PKG / "daemon" / f"{module}.py")
    below = {f"repctl.daemon.{m}" for m in ORDER[ORDER.index(module):]}
    assert not mine & below, f"{module} imports {sorted(mine & below)}"
    assert "repctl.daemon" not in mine


def test_nothing_below_the_daemon_imports_it() -> None:
    allowed = {"cli.py", "render.py", "follow.py"}  # the CLI; render and follow name states only
    for path in PKG.glob("*.py"):
        used = {m for m in imports_of(path) if m.startswith("repctl.daemon")}
        if path.name in allowed:
            assert used <= {"repctl.daemon", "repctl.daemon.Daemon", "repctl.daemon.state",
                            "repctl.daemon.state.Event", "repctl.daemon.state.LinkState",
                            "repctl.daemon.state.Role"}, (path.name, used)
        else:
            assert not used, (path.name, used)


@pytest.mark.parametrize("enum", [S.Role, S.Admin, S.LinkState, S.Connection, S.ReplicaState,
                                  S.Event, S.DiskState])
def test_states_serialise_as_their_word(enum: type) -> None:
    for member in enum:
        assert json.loads(json.dumps(member)) == member.value == str(member) == f"{member}"
        assert enum(member.value) is member
        assert member.value.lower() == member.name.lower().replace("_", "" if enum is S.DiskState
                                                                   else "_")
