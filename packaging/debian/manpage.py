#!/usr/bin/python3
"""Build-time helper of debian/rules for the man page repctl.1 (help2man).

    manpage.py commands     print help2man's include file: each command's --help, SEE ALSO
    repctl --help           (this file, called through a symlink named repctl) the staged
                            command, for help2man

debian/rules puts the staged site (debian/repctl/usr/lib/repctl/site) on PYTHONPATH and sets
TYPER_USE_RICH=0, so that the help is click's plain text, which help2man can read.
"""

import os
import sys

sys.path.pop(0)  # debian/, which holds the staging folder debian/repctl: not a package

import typer
from repctl.cli import app

DOCS = ("install.md", "cli.md", "config.md", "failover.md", "pacemaker.md", "dm-repl.rst")


def roff(text: str) -> str:
    """text as roff lines: backslashes escaped, no line taken for a request."""
    lines = []
    for line in text.splitlines():
        line = line.replace("\\", "\\e")
        lines.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(lines)


def commands() -> None:
    group = typer.main.get_command(app)  # a click group (typer vendors its own click)
    ctx = typer.Context(group, info_name="repctl")
    print("[COMMANDS]")
    print("Each command's own --help.")
    for name in group.list_commands(ctx):  # type: ignore[attr-defined]
        cmd = group.get_command(ctx, name)  # type: ignore[attr-defined]
        sub = typer.Context(cmd, info_name=name, parent=ctx)
        print(f'.SS "repctl {name}"')
        print(".nf")
        print(roff(cmd.get_help(sub)))
        print(".fi")
    print("[FILES]")
    print(".TP\n/etc/repctl/repctl.yaml\nthe configuration (an example: /etc/repctl/repctl.yaml.example)")
    print(".TP\n/lib/systemd/system/repctl.service\nthe node daemon, \\fBrepctl daemon\\fR")
    print(".TP\n/usr/lib/repctl/site\nrepctl and the Python packages it needs (vendored)")
    print("[SEE ALSO]")
    print("In /usr/share/doc/repctl: " + ", ".join(DOCS) + ".")


if __name__ == "__main__":
    if os.path.basename(sys.argv[0]) == "repctl":
        sys.exit(app(prog_name="repctl"))
    if sys.argv[1:] == ["commands"]:
        commands()
    else:
        sys.exit(__doc__)
