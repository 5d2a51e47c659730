"""`coheara keys`: create, list and revoke the API keys `coheara serve` accepts.

The store is `COHEARA_KEYS_PATH` (default `keys.json` in the user data directory). A
running server sees a new or revoked key at its next request, without a restart.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from coheara.access.keys import ALL, ENDPOINTS, KeyStore
from coheara.cli.common import err_console, write
from coheara.settings import load_settings

keys_app = typer.Typer(
    help="API keys for `coheara serve`: create (shown once), list, revoke.",
    no_args_is_help=True,
)


def _store() -> KeyStore:
    return KeyStore(load_settings().keys_path)


@keys_app.command()
def create(
    name: Annotated[str, typer.Argument(help="A plain name for the client, e.g. radiology-pacs.")],
    task: Annotated[
        list[str] | None,
        typer.Option(
            "--task",
            help="A task id it may run (repeat; default: every task). A key limited to "
            "tasks gets only the tasks endpoint unless --endpoint says otherwise.",
        ),
    ] = None,
    endpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--endpoint",
            help=f"An endpoint it may call: {', '.join(ENDPOINTS)} (repeat; default: all).",
        ),
    ] = None,
) -> None:
    """Make a key and print it once on stdout: only its salted hash is kept."""
    store = _store()
    record, key = store.create(name, task or (), endpoint or ())
    write(key + "\n")
    dialects = sorted(set(record.endpoints) & {"native", "openai", "ollama", ALL})
    if task and dialects:
        err_console.print(
            f"warning: the key may also call {', '.join(dialects)}, where any prompt goes: "
            "its task limit binds only the tasks endpoint",
            soft_wrap=True,
        )
    err_console.print(
        f"created key {escape(record.name)} (id {record.id}) in {escape(str(store.path))}: "
        "it is shown only now, store it where the client keeps its secrets",
        soft_wrap=True,
    )


@keys_app.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array on stdout.")] = False,
) -> None:
    """Every key: name, id, created, status, tasks, endpoints (never a hash or a salt)."""
    rows = [record.public() for record in _store().records()]
    if as_json:
        write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        err_console.print("no keys: the server is open on loopback and refuses other binds")
        return
    table = Table(box=None, header_style="bold")
    for column in ("name", "id", "created", "status", "tasks", "endpoints"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            escape(row["name"]),
            row["id"],
            row["created"],
            row["status"],
            ", ".join(row["tasks"]),
            ", ".join(row["endpoints"]),
        )
    Console(highlight=False, width=200).print(table)


@keys_app.command()
def revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: a running server refuses it from its next request on."""
    store = _store()
    record = store.revoke(name)
    err_console.print(
        f"revoked key {escape(record.name)} (id {record.id}) at {record.revoked}", soft_wrap=True
    )
    if store.active_count() == 0:
        err_console.print(
            "no active key is left: the server now refuses every request (it does not reopen); "
            f"create a key, or remove {escape(str(store.path))} to run open on loopback",
            soft_wrap=True,
        )
