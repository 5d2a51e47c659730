"""`coheara plan`: will the model, this window and this many parallel requests fit?"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coheara.deploy.plan import (
    GIB,
    KNOWN_DEVICES,
    Plan,
    for_runtime,
    largest_context,
    largest_parallel,
    plan,
)


def plan_command(
    runtime: Annotated[
        str,
        typer.Option(
            help="Whose behaviour to plan for: ollama (llama.cpp) or transformers (measured "
            "on CUDA); it sets the defaults of the options below."
        ),
    ] = "ollama",
    variant: Annotated[
        str | None,
        typer.Option(
            help="Weights: bf16, q8_0, q4_K_M, or custom (with --weights-gb). "
            "Default: q4_K_M on ollama, bf16 on transformers."
        ),
    ] = None,
    weights_gb: Annotated[
        float | None, typer.Option(help="Size of the weights in GB (a custom build).")
    ] = None,
    context: Annotated[int, typer.Option(help="Context window per sequence, tokens.")] = 8192,
    parallel: Annotated[int, typer.Option(help="Sequences served at once.")] = 1,
    kv_type: Annotated[
        str | None,
        typer.Option(
            help="KV cache precision: f16, bf16, q8_0, q4_0, f32 (default: the runtime's)."
        ),
    ] = None,
    sliding_window_cache: Annotated[
        bool,
        typer.Option(help="Whether the runtime's cache keeps only 1024 tokens on local layers."),
    ] = True,
    vision: Annotated[bool, typer.Option(help="Count the image encoder's working memory.")] = True,
    flash_attention: Annotated[
        bool | None,
        typer.Option(
            help="The runtime never materializes attention scores (default: the runtime's)."
        ),
    ] = None,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(
            help="Prompt tokens processed at once (ollama: 512; transformers: the prompt)."
        ),
    ] = None,
    memory_gb: Annotated[
        float | None,
        typer.Option(help="A memory size (GB) to solve for: the largest window and parallelism."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Memory for weights, KV cache, image encoder and activations, and what fits where."""
    request = for_runtime(
        runtime,  # type: ignore[arg-type]  # checked by for_runtime
        variant=variant,
        weights_gb=weights_gb,
        context=context,
        parallel=parallel,
        kv_type=kv_type,
        sliding_window_cache=sliding_window_cache,
        vision=vision,
        flash_attention=flash_attention,
        prefill_chunk=prefill_chunk,
    )
    result = plan(request)
    solved: dict[str, int | None] = {}
    if memory_gb is not None:
        memory = int(memory_gb * 10**9)
        solved = {
            "memory_bytes": memory,
            "largest_context": largest_context(request, memory),
            "largest_parallel": largest_parallel(request, memory),
        }
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), **({"solve": solved} if solved else {})}))
        return
    _print(result, solved)


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def _print(result: Plan, solved: dict[str, int | None]) -> None:
    console = Console(highlight=False)
    request = result.request
    cache = "sliding-window-aware" if request.sliding_window_cache else "full"
    table = Table(
        title=f"MedGemma 1.5 4B {request.variant}, {request.context} tokens x "
        f"{request.parallel}, KV {request.kv_type} ({cache} cache)"
        + (", dense mask" if request.dense_mask else "")
    )
    table.add_column("memory")
    table.add_column("size", justify="right")
    for name, value in (
        ("weights", result.weights),
        ("KV cache", result.kv_cache),
        ("image encoder", result.vision),
        ("activations", result.activations),
        ("total", result.total),
    ):
        table.add_row(name, _gib(value))
    console.print(table)
    devices = Table(title="Where it fits")
    devices.add_column("device")
    devices.add_column("usable", justify="right")
    devices.add_column("fits")
    for device in KNOWN_DEVICES:
        devices.add_row(
            device.name, _gib(device.usable_bytes), "yes" if device.name in result.fits else "no"
        )
    console.print(devices)
    rows = ", ".join(f"{row}: {'yes' if ok else 'no'}" for row, ok in result.spec_rows.items())
    console.print(f"Spec hardware rows: {rows}")
    if solved:
        window = solved["largest_context"]
        console.print(
            f"In {(solved['memory_bytes'] or 0) / 10**9:g} GB: the longest window at "
            f"{request.parallel} sequence(s) is "
            + (f"{window} tokens" if window else "none (the weights alone do not fit)")
            + (
                "."  # the in-process backend generates one request at a time
                if request.dense_mask
                else f"; at {request.context} tokens, {solved['largest_parallel']} sequence(s)."
            )
        )
