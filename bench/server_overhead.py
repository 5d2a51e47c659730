"""Time to first token and the server's per-request overhead over the direct engine call.

Runs the tiny random-weight model in process, then the same greedy request
through `coheara serve` over loopback in each dialect (native NDJSON, OpenAI
SSE, Ollama NDJSON), at 1 and 16 concurrent streams. The baseline (direct
engine call) is measured in the same run. Medians, with p90 beside them: the
machines are shared and noisy.

    python bench/server_overhead.py [--rounds 5] [--max-tokens 32] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from coheara import Engine, load_settings
from coheara.backends.transformers_backend import TransformersBackend
from coheara.dev.tiny_model import build_tiny_model
from coheara.server.app import create_app
from coheara.server.background import serve_in_thread

PROMPT = "Draft a one-line handoff: 71-year-old, day 2 after hip replacement, pain controlled."
Timing = tuple[float, float]  # (time to first token, total), seconds


async def direct(engine: Engine, max_tokens: int) -> Timing:
    started = time.perf_counter()
    first = None
    async for chunk in engine.stream(PROMPT, max_tokens=max_tokens):
        if chunk.text and first is None:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return (first if first is not None else total), total


async def _lines(
    client: httpx.AsyncClient, path: str, body: dict[str, object], is_token: Callable[[str], bool]
) -> Timing:
    started = time.perf_counter()
    first = None
    async with client.stream("POST", path, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and line and is_token(line):
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    return (first if first is not None else total), total


def _native_token(line: str) -> bool:
    return bool(json.loads(line).get("type") == "delta")


def _openai_token(line: str) -> bool:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def _ollama_token(line: str) -> bool:
    return bool(json.loads(line).get("message", {}).get("content"))


def server_paths(
    client: httpx.AsyncClient, max_tokens: int
) -> dict[str, Callable[[], Awaitable[Timing]]]:
    return {
        "server native": lambda: _lines(
            client,
            "/v1/generate",
            {"prompt": PROMPT, "max_tokens": max_tokens, "stream": True},
            _native_token,
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
            },
            _openai_token,
        ),
        "server ollama": lambda: _lines(
            client,
            "/api/chat",
            {
                "model": "medgemma",
                "messages": [{"role": "user", "content": PROMPT}],
                "options": {"num_predict": max_tokens, "temperature": 0},
            },
            _ollama_token,
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
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(Path(tmp))
        settings = load_settings()
        engine = Engine(TransformersBackend(tmp, device="cpu"), settings)
        await direct(engine, max_tokens)  # load and warm up
        with serve_in_thread(create_app(engine, settings)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=300) as client:
                paths: dict[str, Callable[[], Awaitable[Timing]]] = {
                    "direct engine": lambda: direct(engine, max_tokens),
                    **server_paths(client, max_tokens),
                }
                for call in paths.values():
                    await call()  # warm every path once
                table = Table(
                    title=f"tiny model, {max_tokens} output tokens, {rounds} rounds per level"
                )
                for column in (
                    "path",
                    "streams",
                    "requests",
                    "TTFT p50 ms",
                    "TTFT p90 ms",
                    "total p50 ms",
                    "overhead p50 ms",
                    "total / direct",
                ):
                    table.add_column(column, justify="right" if column != "path" else "left")
                for level in levels:
                    baseline: float | None = None
                    for name, call in paths.items():
                        timings = await measure(call, level, rounds)
                        ttft = [t for t, _ in timings]
                        total = [t for _, t in timings]
                        median_total = statistics.median(total) * 1000
                        if baseline is None:
                            baseline = median_total
                        table.add_row(
                            name,
                            str(level),
                            str(len(timings)),
                            f"{_ms(ttft):.1f}",
                            f"{_ms(ttft, 0.9):.1f}",
                            f"{median_total:.1f}",
                            f"{median_total - baseline:+.1f}",
                            f"{median_total / baseline:.2f}",
                        )
                console.print(table)
        await engine.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.max_tokens, arguments.concurrency))
