"""CLI: ``leukoflow keys create|add|list`` - CurveZMQ key pairs for authenticated transport.

``keys create DIR`` writes the servers' key pair and one client key pair per role
(acquire, infer, collector, supervisor, viewer) as ZeroMQ certificate text files (Z85 keys,
mode 0600, in a 0700 folder). Point every service at the folder with
``LEUKOFLOW_KEYS=DIR``: bound sockets then require CurveZMQ and admit only the roles of
their endpoint; ``allow_remote`` and connections to other hosts need it. ``keys add`` makes
one more client (e.g. a second inference host), ``keys list`` shows names, roles and public
keys (never secrets). See ``deploy/README.md`` (Security) for what to copy where.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

keys_app = typer.Typer(
    name="keys",
    help="CurveZMQ keys: create the server and client key pairs, add clients, list them.",
    no_args_is_help=True,
)


def _fail(exc: Exception) -> None:
    typer.echo(f"leukoflow keys: {exc}", err=True)
    raise typer.Exit(code=2)


def create_cmd(
    folder: Annotated[Path, typer.Argument(help="Key folder (created with mode 0700).")],
    role: Annotated[list[str] | None, typer.Option(
        "--role", help="Client roles to create (repeat; default: all).")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite existing key files.")] = False,
    if_missing: Annotated[bool, typer.Option(
        "--if-missing", help="Do nothing (but check the keys) when the folder already has a "
        "server key (container start-up).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Create the server key pair and one client key pair per role."""
    from leukoflow.core import curve

    try:
        if if_missing and not force and (Path(folder) / f"{curve.SERVER}.key").exists():
            files = []
        else:
            files = curve.create_keys(folder, tuple(role) if role else curve.ROLES,
                                      force=force)
        desc = curve.KeyStore(folder).describe()
    except curve.KeyError_ as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps({**desc, "written": [str(f) for f in files]}, indent=1))
        return
    if not files:
        typer.echo(f"{folder} already has keys ({len(desc['keys'])} key pairs); kept")
        return
    typer.echo(f"wrote {len(files)} files to {folder} (mode 0600, folder 0700)")
    typer.echo(f"use them with: export {curve.KEYS_ENV}={Path(folder).resolve()}")


def add_cmd(
    folder: Annotated[Path, typer.Argument(help="Key folder.")],
    name: Annotated[str, typer.Argument(help="Key name (file stem), e.g. infer-gpu2.")],
    role: Annotated[str, typer.Option("--role", help="Client role of the new key.")],
    force: Annotated[bool, typer.Option(
        "--force", help="Overwrite existing key files.")] = False,
) -> None:
    """Add one client key pair (restart the servers to admit it)."""
    from leukoflow.core import curve

    try:
        files = curve.add_client(folder, name, role, force=force)
    except curve.KeyError_ as exc:
        _fail(exc)
    typer.echo("\n".join(str(f) for f in files))


def list_cmd(
    folder: Annotated[Path, typer.Argument(help="Key folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List key names, roles, public keys and whether the secret is on this host."""
    from leukoflow.core import curve

    try:
        desc = curve.KeyStore(folder).describe()
    except curve.KeyError_ as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(desc, indent=1))
        return
    for k in desc["keys"]:
        typer.echo(f"{k['name']:<16} {k['role']:<11} {k['public']} "
                   f"{'secret' if k['secret_here'] else 'public only'}")


def register(app: typer.Typer) -> None:
    """Add ``keys`` to ``app``."""
    keys_app.command("create")(create_cmd)
    keys_app.command("add")(add_cmd)
    keys_app.command("list")(list_cmd)
    app.add_typer(keys_app, name="keys")
