"""The `repctl` command line: thin commands over the service layer.

Commands that act on a running resource ask the node daemon over the control socket
(`repctl.control`); `create-md` works on the local devices directly; `daemon` runs the daemon.
Every domain error (`ReplError`) is caught here, at the edge, and becomes one line
``repctl: error: <text>`` on stderr and exit status 1. Usage errors exit 2 (typer's own).
docs/cli.md documents every command and its exit statuses.

Start time matters: the OCF agent runs ``repctl status --json`` at every monitor, and in the
emulated test VM every import costs many times what it does on the host. So what one command
alone uses is imported in that command: ``repctl status --json`` loads typer, the configuration
and the control client, and neither rich, the metadata code (cffi) nor the daemon.
docs/benchmarks.md, "CLI start", has the figures.
"""

from __future__ import annotations

import functools
import json as jsonlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from repctl import follow, render
from repctl.config import DEFAULT_CONFIG_PATH, Config, load_config
from repctl.control import ControlClient
from repctl.errors import ReplError

app = typer.Typer(
    no_args_is_help=True,
    help="Block-level replication over TCP with the dm-repl target.",
    pretty_exceptions_show_locals=False,
)

log = logging.getLogger("repctl")

#: Seconds a daemon command may take before the CLI gives up (verify has no limit).
CALL_TIMEOUT = 120.0

#: Exit status of `verify` when the target differs from the source.
EXIT_DIFFERS = 3

#: `verify` lists at most this many differing chunks.
VERIFY_SHOWN = 20

#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130

#: Seconds between two status polls while `verify` or `--wait` shows progress.
POLL_INTERVAL = follow.POLL_INTERVAL

#: Seconds a status poll may take while `verify` runs (its progress display skips a slow one).
POLL_TIMEOUT = 5.0

#: Seconds between two redraws of `status --watch` without --interval.
WATCH_INTERVAL = 2.0

#: Seconds the daemon may take to stop a verify when Ctrl-C cancels it (it waits up to 30).
CANCEL_TIMEOUT = 40.0

#: How `status --watch` waits between two redraws (tests replace it).
_sleep = time.sleep

P = ParamSpec("P")
R = TypeVar("R")


# --------------------------------------------------------------------------------------------
# The edge: options shared by every command, and domain errors turned into one line
# --------------------------------------------------------------------------------------------


class Session:
    """What every command gets from the global options: the configuration and a daemon client."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    def config(self) -> Config:
        """The validated configuration (loaded once); ConfigError if it is wrong."""
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def client(self, timeout: float | None = CALL_TIMEOUT) -> ControlClient:
        """A client of this node's daemon, at ``global.control_socket``."""
        return ControlClient(self.config().global_.control_socket, timeout)


def _session(ctx: typer.Context) -> Session:
    obj = ctx.find_root().obj
    assert isinstance(obj, Session)
    return obj


def fail(text: str, code: int = 1) -> typer.Exit:
    """Print ``repctl: error: <text>`` on stderr; return the Exit to raise."""
    typer.echo(f"repctl: error: {text}", err=True)
    return typer.Exit(code)


def edge(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a command; a ReplError becomes ``repctl: error: ...`` and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ReplError as exc:
            raise fail(str(exc) or type(exc).__name__) from None

    return wrapper


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            envvar="REPCTL_CONFIG",
            help="The configuration file.",
            show_default=True,
        ),
    ] = DEFAULT_CONFIG_PATH,
) -> None:
    """Block-level replication over TCP with the dm-repl target."""
    ctx.obj = Session(config)


@app.command()
def version() -> None:
    """Print the version of repctl."""
    from repctl import __version__

    typer.echo(__version__)


# --------------------------------------------------------------------------------------------
# create-md: the local service that formats a metadata device
# --------------------------------------------------------------------------------------------


@app.command("create-md")
@edge
def create_md(
    ctx: typer.Context,
    resource: Annotated[str, typer.Argument(help="The resource whose metadata to format.")],
    node: Annotated[
        str | None,
        typer.Option("--node", "-n", help="Act as this node of the resource (default: host name)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite existing metadata or other data.")
    ] = False,
    all_dirty: Annotated[
        bool, typer.Option("--all-dirty", help="Mark every chunk dirty (resync everything).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be written; write nothing.")
    ] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Format the local metadata device of RESOURCE (superblock and dirty bitmap).

    Refuses a metadata device that is missing, too small, in use, or already formatted
    (unless --force).
    """
    from repctl import metadata  # only create-md needs it: cffi is slow to import (start time)
    from repctl.mdplan import create_metadata, describe_plan, plan_metadata

    plan = plan_metadata(_session(ctx).config(), resource, node)
    if dry_run:
        if plan.existing and not force:
            raise metadata.MetadataError(
                f"{plan.metadata}: already holds {plan.existing}; use --force to overwrite it"
            )
        if json:
            render.print_json({"dry_run": True, **asdict(plan), "all_dirty": all_dirty})
            return
        typer.echo(f"would format {plan.metadata} for {plan.resource} on {plan.node}")
        if plan.existing:
            typer.echo(f"  replacing {plan.existing}")
        for line in describe_plan(plan, all_dirty):
            typer.echo(line)
        return
    sb = create_metadata(plan, force=force, all_dirty=all_dirty)
    if json:
        render.print_json({"dry_run": False, **asdict(plan), "all_dirty": all_dirty,
                           "uuid": sb.uuid})
        return
    typer.echo(f"formatted {plan.metadata} for {plan.resource} on {plan.node}")
    if plan.existing:
        typer.echo(f"  replaced  {plan.existing}")
    typer.echo(f"  uuid      {sb.uuid}")
    for line in describe_plan(plan, all_dirty):
        typer.echo(line)


# --------------------------------------------------------------------------------------------
# daemon
# --------------------------------------------------------------------------------------------


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _setup_logging(level: LogLevel) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.value.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


@app.command()
@edge
def daemon(
    ctx: typer.Context,
    node: Annotated[
        str | None,
        typer.Option("--node", "-n", help="Run as this node (default: the host name)."),
    ] = None,
    log_level: Annotated[
        LogLevel, typer.Option("--log-level", case_sensitive=False, help="Logging threshold.")
    ] = LogLevel.info,
) -> None:
    """Run the node daemon in the foreground (what the repctl systemd service runs).

    Serves every resource of this node and the control socket; SIGTERM or SIGINT stops it.
    """
    _setup_logging(log_level)
    cfg = _session(ctx).config()
    try:
        from repctl.daemon import Daemon
    except ImportError as exc:
        raise ReplError(f"the node daemon cannot be loaded: {exc}") from None
    from repctl.control import ControlServer  # only the daemon serves (start time)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        d = Daemon(cfg, node)
        server = ControlServer(cfg.global_.control_socket, d)
        server.bind()  # first: a second daemon must fail before it touches any device
        try:
            d.start()
            server.serve()
            log.info("repctl daemon running; control socket %s", server.path)
            while not stop.wait(1.0):
                pass
        finally:
            server.stop()
            d.stop()
        log.info("repctl daemon stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------
# Commands that ask the daemon
# --------------------------------------------------------------------------------------------

ResourceArg = Annotated[str, typer.Argument(help="The resource.", show_default=False)]
TargetArg = Annotated[
    str | None, typer.Argument(help="One target of the resource (default: all of them).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
WaitOpt = Annotated[
    bool,
    typer.Option("--wait", help="Then wait until the target(s) stream, showing the resync."),
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", min=0, metavar="SECONDS",
                 help="With --wait: give up after SECONDS (exit 1; the resync goes on)."),
]


def _ask(ctx: typer.Context, cmd: str, resource: str, target: str | None = None) -> None:
    result = _session(ctx).client().call(cmd, resource=resource, target=target)
    if isinstance(result, str) and result:
        typer.echo(result)
    elif result in (None, "", {}, []):
        where = f"{resource}/{target}" if target else resource
        typer.echo(f"{where}: {cmd}: done")
    else:
        render.print_json(result)


@app.command()
@edge
def up(ctx: typer.Context, resource: ResourceArg) -> None:
    """Bring RESOURCE up on this node, in its role (primary or secondary)."""
    _ask(ctx, "up", resource)


@app.command()
@edge
def down(ctx: typer.Context, resource: ResourceArg) -> None:
    """Take RESOURCE down on this node."""
    _ask(ctx, "down", resource)


@app.command()
@edge
def promote(
    ctx: typer.Context,
    resource: ResourceArg,
    force: Annotated[bool, typer.Option(
        "--force", help="Promote even if this node's data is Inconsistent or Outdated (it then "
        "serves data that may be incomplete or old). Overrides no other check.")] = False,
) -> None:
    """Make this node the primary of RESOURCE: /dev/mapper/RESOURCE appears here and the other
    nodes become its targets, each resyncing only what differs.

    Refused, with nothing changed, while another node is primary and reachable, when this
    node's data is Inconsistent, or when fencing is on and the fence-peer hook fails
    (docs/failover.md).
    """
    if force:
        typer.echo(f"{resource}: promoting by force: this node's data may be incomplete or old",
                   err=True)
    result = _session(ctx).client(timeout=None).call("promote", resource=resource, force=force)
    typer.echo(result)


@app.command()
@edge
def demote(ctx: typer.Context, resource: ResourceArg) -> None:
    """Make this primary a secondary: undo the actions (unmount, ...), drain the writes to the
    targets, remove /dev/mapper/RESOURCE. Refused while the device is in use (says by whom)."""
    typer.echo(_session(ctx).client(timeout=None).call("demote", resource=resource))


@app.command()
@edge
def resolve(
    ctx: typer.Context,
    resource: ResourceArg,
    discard_local: Annotated[bool, typer.Option(
        "--discard-local", help="Required: this node's changes since the split are overwritten "
        "by the primary's data.")] = False,
) -> None:
    """Settle a split brain on its victim: this node becomes a secondary of the primary, which
    resyncs the chunks this node changed (DRBD's connect --discard-my-data)."""
    if not discard_local:
        raise typer.BadParameter("say --discard-local: this node's changes since the split are "
                                 "lost", param_hint="'--discard-local'")
    typer.echo(_session(ctx).client(timeout=None).call("resolve", resource=resource,
                                                       discard_local=True))


@app.command()
@edge
def pause(ctx: typer.Context, resource: ResourceArg, target: TargetArg = None) -> None:
    """Pause mirroring to TARGET (or every target); changes are tracked in the bitmap."""
    _ask(ctx, "pause", resource, target)


@app.command()
@edge
def resume(
    ctx: typer.Context, resource: ResourceArg, target: TargetArg = None, wait: WaitOpt = False,
    timeout: TimeoutOpt = None,
) -> None:
    """Resume a paused mirror; only the chunks changed meanwhile are resynchronised.

    With --wait, return only once TARGET (or every target) streams again; exit 1 if one is
    paused or disconnected meanwhile, or when --timeout passes.
    """
    _ask_and_wait(ctx, "resume", resource, target, wait, timeout)


@app.command()
@edge
def connect(
    ctx: typer.Context, resource: ResourceArg, target: TargetArg = None, wait: WaitOpt = False,
    timeout: TimeoutOpt = None,
) -> None:
    """Connect to TARGET (or every target) again after a disconnect.

    With --wait, return only once TARGET (or every target) streams; exit 1 if one is paused or
    disconnected meanwhile, or when --timeout passes.
    """
    _ask_and_wait(ctx, "connect", resource, target, wait, timeout)


def _ask_and_wait(
    ctx: typer.Context, cmd: str, resource: str, target: str | None, wait: bool,
    timeout: float | None,
) -> None:
    if timeout is not None and not wait:
        raise typer.BadParameter("--timeout goes with --wait", param_hint="'--timeout'")
    _ask(ctx, cmd, resource, target)
    if not wait:
        return
    with _progress() as show:
        draw = None if show is None else lambda entries: show(
            {f"{resource}/{t.get('name')}": render.sync_bar(t) for t in entries}
        )
        try:
            names = follow.wait_streaming(
                functools.partial(_status, ctx, resource), resource,
                [target] if target else None, timeout=timeout, show=draw, interval=POLL_INTERVAL,
            )
        except KeyboardInterrupt:
            raise fail(f"stopped waiting; the daemon goes on (repctl status {resource})",
                       EXIT_INTERRUPTED) from None
    for name in names:
        typer.echo(f"{resource}/{name}: streaming")


@app.command()
@edge
def disconnect(ctx: typer.Context, resource: ResourceArg, target: TargetArg = None) -> None:
    """Drop the connection to TARGET (or every target) and stay disconnected."""
    _ask(ctx, "disconnect", resource, target)


def _status(ctx: typer.Context, resource: str | None, *,
            missing_ok: bool = False) -> dict[str, Any]:
    """The daemon's status document, only `resource`'s entry if one is named: ReplError if it
    is not up (with `missing_ok`, a document without resources then)."""
    st = _session(ctx).client().call("status")
    if not isinstance(st, dict) or not isinstance(st.get("resources", []), list):
        raise ReplError("the repctl daemon sent a malformed status")
    if resource is None:
        return st
    chosen = [r for r in st.get("resources") or [] if r.get("name") == resource]
    if not chosen and not missing_ok:
        cfg = _session(ctx).config()
        if resource not in cfg.resources:
            raise ReplError(f"unknown resource {resource!r}: {cfg.file} has "
                            f"{', '.join(cfg.resources) or 'none'}; check the name")
        node = st.get("node") or "this node"
        raise ReplError(f"resource {resource} is not up on {node} (repctl up {resource}; "
                        "repctl status shows what is up)")
    return {**st, "resources": chosen}


@app.command()
@edge
def status(
    ctx: typer.Context,
    resource: Annotated[str | None, typer.Argument(help="Only this resource.")] = None,
    json: Annotated[
        bool,
        typer.Option("--json", help="Print the daemon's status document as JSON (docs/cli.md); "
                     "a target being verified has a 'verify' object with its progress."),
    ] = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", "-w", help="Redraw every --interval seconds until Ctrl-C; with "
                     "--json, one JSON document per line each time."),
    ] = False,
    interval: Annotated[
        float | None,
        typer.Option("--interval", "-i", min=0.2, metavar="SECONDS",
                     help=f"With --watch: seconds between two redraws (default "
                     f"{WATCH_INTERVAL:g})."),
    ] = None,
) -> None:
    """Show the state of every resource and target of this node."""
    if interval is not None and not watch:
        raise typer.BadParameter("--interval goes with --watch", param_hint="'--interval'")
    if watch and interval is None and resource is not None and _is_number(resource) and (
            resource not in _session(ctx).config().resources):
        # `--watch 2`, as earlier versions took it: 2 is no resource
        raise typer.BadParameter(f"--watch takes no value; say --watch --interval {resource}",
                                 param_hint="'--watch'")
    doc = _status(ctx, resource)  # also with --watch: an unreachable daemon fails here, at once
    if watch:
        _watch(ctx, resource, doc, json, WATCH_INTERVAL if interval is None else interval)
    elif json:
        render.print_json(doc)
    else:
        render.console().print(render.status_view(doc))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _watch(ctx: typer.Context, resource: str | None, doc: dict[str, Any], json: bool,
           interval: float) -> None:
    """`status --watch`: show `doc`, then a fresh status every `interval` seconds until Ctrl-C
    (which returns: exit 0). On a terminal the table is redrawn in place (rich Live); in a pipe
    each snapshot follows the last, after a blank line; with `json`, one compact JSON document
    per line. ReplError if the daemon goes away meanwhile; a resource that goes down is shown
    as not up, and watched on."""
    empty = f"{resource} is not up on this node" if resource else "no resource is up"

    def poll() -> dict[str, Any]:
        try:
            return _status(ctx, resource, missing_ok=True)
        except ReplError as exc:
            raise ReplError(f"stopped watching: {exc}") from None

    def view(st: Mapping[str, Any]) -> Any:
        return render.status_view(st, empty=empty, header=(
            f"{time.strftime('%H:%M:%S')}, every {interval:g} s (Ctrl-C stops)"))

    try:
        if json:
            while True:
                typer.echo(jsonlib.dumps(doc))
                _sleep(interval)
                doc = poll()
        con = render.console()
        if not con.is_terminal:
            while True:
                con.print(view(doc))
                con.print()
                _sleep(interval)
                doc = poll()
        from rich.live import Live  # only --watch on a terminal redraws (start time)

        with Live(view(doc), console=con, auto_refresh=False) as live:
            while True:
                _sleep(interval)
                doc = poll()
                live.update(view(doc), refresh=True)
    except KeyboardInterrupt:
        return


@contextmanager
def _progress() -> Iterator[Callable[[dict[str, render.Bar]], None] | None]:
    """Progress bars on stderr, only on a terminal: yields a function that shows the given bars
    (redrawn a few times a second, cleared at the end), or None when stderr is not a terminal, so
    that a log or a pipe gets no bar."""
    con = render.console(stderr=True)
    if not con.is_terminal:
        yield None
        return
    from rich.live import Live

    with Live(render.progress_view({}), console=con, transient=True,
              refresh_per_second=4) as live:
        yield lambda bars: live.update(render.progress_view(bars), refresh=True)


def _verify_call(session: Session, resource: str, target: str, repair: bool = False) -> Any:
    """The daemon's verify result. On a terminal, a second connection polls the status meanwhile
    and a bar shows the target's ``verify`` progress."""
    extra = {"repair": True} if repair else {}  # a daemon without --repair refuses the argument

    def call() -> Any:
        return session.client(timeout=None).call("verify", resource=resource, target=target,
                                                  **extra)

    name = f"{resource}/{target}"
    with _progress() as show:
        if show is None:
            return call()
        show({name: render.Bar(0, None, "starting")})

        def draw(st: Mapping[str, Any]) -> None:
            t = follow.find_target(st, resource, target)
            if t is not None and isinstance(t.get("verify"), dict):
                show({name: render.verify_bar(t["verify"])})

        def poll() -> Any:
            return session.client(POLL_TIMEOUT).call("status")

        return follow.call_with_progress(call, poll, draw, POLL_INTERVAL)


def _cancel_verify(session: Session, resource: str, target: str) -> typer.Exit:
    """After Ctrl-C: ask the daemon to stop the verify (it does at the next chunk boundary and
    answers once it has), say so; return the Exit (130) to raise."""
    name = f"{resource}/{target}"
    try:
        session.client(CANCEL_TIMEOUT).call("cancel_verify", resource=resource, target=target)
    except ReplError as exc:
        return fail(f"{name}: interrupted, but the verify could not be cancelled: {exc} "
                    f"(repctl status {resource} shows whether it still runs)", EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        return fail(f"{name}: interrupted while cancelling the verify (repctl status {resource} "
                    "shows whether it still runs)", EXIT_INTERRUPTED)
    typer.echo(f"{name}: verify cancelled", err=True)
    return typer.Exit(EXIT_INTERRUPTED)


VERIFY_COLUMNS = (
    render.Column("chunk", "Chunk", justify="right"),
    render.Column("offset", "Offset", justify="right"),
    render.Column("length", "Length", render.human_bytes, "right"),
)


@app.command()
@edge
def verify(
    ctx: typer.Context,
    resource: ResourceArg,
    target: Annotated[str, typer.Argument(help="The target to compare with.", show_default=False)],
    json: JsonOpt = False,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Mark the chunks that differ out of sync for TARGET and "
                     "resync them from this node (as any resync: repctl status shows it)."),
    ] = False,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="With --repair: then wait until TARGET streams again with "
                     "nothing out of sync, showing the resync."),
    ] = False,
    timeout: TimeoutOpt = None,
) -> None:
    """Compare RESOURCE with TARGET chunk by chunk (checksums); exit 0 only if identical.

    Exit 3 when chunks differ (also when --repair resyncs them), 1 on an error. The daemon
    blocks until the comparison is done; on a terminal a progress bar shows how far it is.
    Ctrl-C cancels the comparison in the daemon too (exit 130).
    """
    if wait and not repair:
        raise typer.BadParameter("--wait goes with --repair", param_hint="'--wait'")
    if timeout is not None and not wait:
        raise typer.BadParameter("--timeout goes with --wait", param_hint="'--timeout'")
    session = _session(ctx)
    try:
        result = _verify_call(session, resource, target, repair)
    except KeyboardInterrupt:
        raise _cancel_verify(session, resource, target) from None
    if not isinstance(result, dict):
        raise ReplError("the repctl daemon sent a malformed verify result")
    differing = [c for c in result.get("differing") or [] if isinstance(c, int)]
    count = result.get("differing_count", len(differing))
    identical = bool(result.get("identical", count == 0))
    chunks, chunk_size = result.get("chunks"), result.get("chunk_size")
    if json:
        render.print_json(result)
    elif identical:
        compared = f" ({chunks} chunks compared)" if chunks is not None else ""
        typer.echo(f"{resource}/{target}: identical{compared}")
    else:
        size = chunk_size if isinstance(chunk_size, int) else 0
        rows = [
            {"chunk": c, "offset": c * size if size else None, "length": size or None}
            for c in differing[:VERIFY_SHOWN]
        ]
        of = f" of {chunks}" if chunks is not None else ""
        footer = [f"... and {count - len(rows)} more"] if count > len(rows) else []
        render.print_table(
            rows, VERIFY_COLUMNS, title=f"{resource}/{target}: {count}{of} chunks differ",
            footer=footer,
        )
    if repair and not identical:
        marked = result.get("marked_out_of_sync")
        if not isinstance(marked, int):
            raise ReplError("the repctl daemon did not say what it marked for the repair")
        if not json:
            typer.echo(f"{resource}/{target}: {marked} chunks marked out of sync: repairing"
                       + ("" if wait else f" (repctl status {resource} shows the resync)"))
        if wait:
            _wait_repaired(ctx, resource, target, timeout, quiet=json)
    raise typer.Exit(0 if identical else EXIT_DIFFERS)


def _wait_repaired(ctx: typer.Context, resource: str, target: str, timeout: float | None,
                   quiet: bool) -> None:
    """`verify --repair --wait`: wait until `target` streams with nothing out of sync (its
    resync of the marked chunks is over), with the resync's bar on a terminal."""
    with _progress() as show:
        draw = None if show is None else lambda entries: show(
            {f"{resource}/{t.get('name')}": render.sync_bar(t) for t in entries}
        )
        try:
            follow.wait_streaming(
                functools.partial(_status, ctx, resource), resource, [target],
                timeout=timeout, show=draw, interval=POLL_INTERVAL, in_sync=True,
            )
        except KeyboardInterrupt:
            raise fail(f"stopped waiting; the daemon goes on with the repair (repctl status "
                       f"{resource})", EXIT_INTERRUPTED) from None
    if not quiet:
        typer.echo(f"{resource}/{target}: repaired, streaming")


@app.command()
@edge
def events(ctx: typer.Context, json: JsonOpt = False) -> None:
    """Follow the daemon's state changes live, one line each, until Ctrl-C."""
    stream = _session(ctx).client().events()
    try:
        for event in stream:
            typer.echo(jsonlib.dumps(event) if json else render.event_line(event))
    except KeyboardInterrupt:
        return
    raise ReplError("the repctl daemon closed the event stream (did it stop?)")
