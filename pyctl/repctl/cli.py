"""The `repctl` command line: thin commands over the service layer."""

import typer

app = typer.Typer(no_args_is_help=True, help="Block-level replication over TCP with the dm-repl target.")


@app.command()
def version() -> None:
    """Print the version of repctl."""
    from repctl import __version__

    typer.echo(__version__)
