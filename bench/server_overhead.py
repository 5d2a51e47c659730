"""Time to first token and the server's per-request overhead over the direct engine call.

Runs the tiny random-weight model in process, then the same greedy request
through `coheara serve` (its own process, as deployed) over loopback in each
dialect (native NDJSON, OpenAI SSE, Ollama NDJSON), at 1 and 16 concurrent
streams. The baseline (direct engine call) is measured in the same run, and
each row shows the output tokens it produced, so every path did the same work.
Medians, with p90 beside them: the machines are shared and noisy.

    python bench/server_overhead.py [--rounds 5] [--max-tokens 32] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table

from coheara import Engine, load_settings
from coheara.backends.transformers_backend import TransformersBackend
from coheara.dev.tiny_model import build_tiny_model
from coheara.server.background import serve_in_process

PROMPT = "Draft a one-line handoff: 71-year-old, day 2 after hip replacement, pain controlled."
Timing = tuple[float, float, int]  # time to first token (s), total (s), output tokens
LineReader = Callable[[str], tuple[bool, int | None]]  # line -> (carries text, output tokens)


async def direct(engine: Engine, max_tokens: int) -> Timing:
    started = time.perf_counter()
    first = None
    tokens = 0
    async for chunk in engine.stream(PROMPT, max_tokens=max_tokens):
        if chunk.text and first is None:
            first = time.perf_counter() - started
        if chunk.result is not None:
            tokens = chunk.result.output_tokens
    total = time.perf_counter() - started
    return (first if first is not None else total), total, tokens


async def _lines(
    client: httpx.AsyncClient, path: str, body: dict[str, object], read: LineReader
) -> Timing:
    started = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line:
                continue
            has_text, count = read(line)
            if first is None and has_text:
                first = time.perf_counter() - started
            tokens = count if count is not None else tokens
    total = time.perf_counter() - started
    return (first if first is not None else total), total, tokens


def _native_line(line: str) -> tuple[bool, int | None]:
    data = json.loads(line)
    if data.get("type") == "result":
        return False, data["result"]["output_tokens"]
    return data.get("type") == "delta", None


def _openai_line(line: str) -> tuple[bool, int | None]:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False, None
    data = json.loads(line[6:])
    usage = data.get("usage") or {}
    choices = data.get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content")), usage.get("completion_tokens")


def _ollama_line(line: str) -> tuple[bool, int | None]:
    data = json.loads(line)
    return bool(data.get("message", {}).get("content")), data.get("eval_count")


def server_paths(
    client: httpx.AsyncClient, max_tokens: int
) -> dict[str, Callable[[], Awaitable[Timing]]]:
    return {
        "server native": lambda: _lines(
            client,
            "/v1/generate",
            {"prompt": PROMPT, "max_tokens": max_tokens, "stream": True},
            _native_line,
        ),
        "server openai": lambda: _lines(
            client,
            "/v1/chat/completions",
            {
                "model": "medgemma",
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            _openai_line,
        ),
        "server ollama": lambda: _lines(
            client,
            "/api/chat",
            {
                "model": "medgemma",
                "messages": [{"role": "user", "content": PROMPT}],
                "options": {"num_predict": max_tokens, "temperature": 0},
            },
            _ollama_line,
        ),
    }


async def measure(
    call: Callable[[], Awaitable[Timing]], concurrency: int, rounds: int
) -> list[Timing]:
    timings: list[Timing] = []
    for _ in range(rounds):
        timings.extend(await asyncio.gather(*(call() for _ in range(concurrency))))
    return timings


def _ms(values: list[float], q: float = 0.5) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(rounds: int, max_tokens: int, levels: list[int]) -> None:
    torch.set_num_threads(1)  # the tiny model's matrices only lose time in a thread pool
    console = Console(width=150)
    # The same one torch thread; no audit trail written to the user's data directory.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "COHEARA_AUDIT_ENABLED": "false"}
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve_in_process(tmp_model(tmp), env=environment) as (url, _),
    ):
        engine = Engine(TransformersBackend(tmp, device="cpu"), load_settings())
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            paths: dict[str, Callable[[], Awaitable[Timing]]] = {
                "direct engine": lambda: direct(engine, max_tokens),
                **server_paths(client, max_tokens),
            }
            for call in paths.values():
                await call()  # load and warm every path once
            table = Table(title=f"tiny model, up to {max_tokens} output tokens, {rounds} rounds")
            for column in COLUMNS:
                table.add_column(column, justify="left" if column == "path" else "right")
            for level in levels:
                baseline: float | None = None
                for name, call in paths.items():
                    timings = await measure(call, level, rounds)
                    median_total = statistics.median(t for _, t, _ in timings) * 1000
                    baseline = baseline or median_total
                    table.add_row(
                        name,
                        str(level),
                        str(len(timings)),
                        str(statistics.median(n for _, _, n in timings)),
                        f"{_ms([t for t, _, _ in timings]):.1f}",
                        f"{_ms([t for t, _, _ in timings], 0.9):.1f}",
                        f"{median_total:.1f}",
                        f"{median_total - baseline:+.1f}",
                        f"{median_total / baseline:.2f}",
                    )
            console.print(table)
        await engine.aclose()


COLUMNS = (
    "path",
    "streams",
    "requests",
    "output tokens",
    "TTFT p50 ms",
    "TTFT p90 ms",
    "total p50 ms",
    "overhead p50 ms",
    "total / direct",
)


def tmp_model(directory: str) -> str:
    build_tiny_model(Path(directory))
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.max_tokens, arguments.concurrency))
