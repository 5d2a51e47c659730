"""The server's per-request overhead: over a stand-in runtime, and on the tiny model.

`--stand-in` (the service's own cost, issue 5's goal: p50 overhead under 2 ms and p99
under 10 ms at 64 streams, audit and API keys on): a stand-in Ollama that answers
instantly (`bench/stand_in_ollama.py`, its own process) behind `coheara serve` (its own
process, as deployed: audit trail on in a temporary folder, an API key required and
sent, JSON logs with access lines). The same streamed `/api/chat` request goes to the
stand-in directly (the baseline, measured in the same run) and through the server, from
1, 16 and 64 concurrent clients in a closed loop. Overhead = the server's latency minus
the direct one, at p50 and p99; throughput in requests a second; and the server's own
CPU time per request (from /proc), the figure least disturbed by a shared machine.
The admission cap is raised above the client count so that queueing is not measured.

    python bench/server_overhead.py --stand-in [--requests 2000] [--concurrency 1 16 64]

Without `--stand-in`: the tiny random-weight model in process, then the same greedy
request through `coheara serve` over loopback in each dialect (native NDJSON, OpenAI
SSE, Ollama NDJSON), at 1 and 16 concurrent streams. The baseline (direct engine call)
is measured in the same run, and each row shows the output tokens it produced, so every
path did the same work. Medians, with p90 beside them: the machines are shared and noisy.

    python bench/server_overhead.py [--rounds 5] [--max-tokens 32] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
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
from coheara.server.background import free_port, serve_in_process

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


# ----- over a stand-in runtime -----------------------------------------------------------

STAND_IN = Path(__file__).resolve().parent / "stand_in_ollama.py"
CHAT = {
    "model": "medgemma",
    "messages": [{"role": "user", "content": PROMPT}],
    "options": {"num_predict": 8, "temperature": 0},
    "stream": True,
}


def _wait_for(url: str, process: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.1)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(
    client: httpx.AsyncClient, path: str, streams: int, total: int
) -> tuple[list[float], float]:
    """`streams` clients, each sending the next request when its last one is answered."""
    latencies: list[float] = []
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            async with client.stream("POST", path, json=CHAT) as response:
                response.raise_for_status()
                async for _ in response.aiter_bytes():
                    pass
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    return latencies, time.perf_counter() - started


def _api_key(folder: Path) -> str | None:
    try:
        from coheara.access.keys import KeyStore
    except ImportError:
        return None
    _, key = KeyStore(folder / "keys.json").create("bench")
    return key


async def stand_in_main(total: int, levels: list[int]) -> None:
    console = Console(width=150)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "empty.toml").write_text("")
        key = _api_key(folder)
        backend_port, server_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COHEARA_", "OLLAMA_"))}
        env.update(
            {
                "XDG_DATA_HOME": str(folder / "data"),
                "COHEARA_CONFIG": str(folder / "empty.toml"),
                "COHEARA_AUDIT_ENABLED": "true",
                "COHEARA_AUDIT_PATH": str(folder / "audit.sqlite3"),
                "COHEARA_KEYS_PATH": str(folder / "keys.json"),
                "COHEARA_LOG_FORMAT": "json",
                "COHEARA_MAX_CONCURRENCY": "1024",
                "COHEARA_MAX_QUEUE": "1024",
            }
        )
        backend_url = f"http://127.0.0.1:{backend_port}"
        server_url = f"http://127.0.0.1:{server_port}"
        serve_command = ["serve", "--backend", "ollama", "--url", backend_url]
        log = (folder / "server.log").open("wb")
        backend = subprocess.Popen([sys.executable, str(STAND_IN), str(backend_port)])
        server = subprocess.Popen(
            [sys.executable, "-m", "coheara.cli.main", *serve_command, "--port", str(server_port)],
            env=env,
            stdout=log,
            stderr=log,
        )
        try:
            _wait_for(f"{backend_url}/api/version", backend)
            _wait_for(f"{server_url}/healthz", server)
            await _stand_in_table(console, backend_url, server_url, key, server.pid, total, levels)
        finally:
            for process in (server, backend):
                process.terminate()
                process.wait(timeout=30)
            log.close()
        audited = _audited(folder / "audit.sqlite3")
        console.print(f"audit records written by the server: {audited}")


def _audited(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path) as connection:
        return int(connection.execute("SELECT count(*) FROM records").fetchone()[0])


async def _stand_in_table(
    console: Console,
    backend_url: str,
    server_url: str,
    key: str | None,
    server_pid: int,
    total: int,
    levels: list[int],
) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=max(levels) + 8)
    table = Table(
        title=f"stand-in runtime (instant), {total} requests a row, audit on, key "
        + ("on" if key else "off")
    )
    for column in STAND_IN_COLUMNS:
        table.add_column(column, justify="left" if column == "path" else "right")
    async with (
        httpx.AsyncClient(base_url=backend_url, timeout=60, limits=limits) as direct_client,
        httpx.AsyncClient(
            base_url=server_url, timeout=60, limits=limits, headers=headers
        ) as server_client,
    ):
        for client in (direct_client, server_client):
            await closed_loop(client, "/api/chat", 4, 200)  # connections, caches, JIT-free warm-up
        for level in levels:
            direct, direct_wall = await closed_loop(direct_client, "/api/chat", level, total)
            cpu = _cpu_s(server_pid)
            served, served_wall = await closed_loop(server_client, "/api/chat", level, total)
            cpu_ms = (_cpu_s(server_pid) - cpu) * 1000 / total
            base50, base99 = _ms(direct), _ms(direct, 0.99)
            for name, timings, wall in (
                ("direct", direct, direct_wall),
                ("server", served, served_wall),
            ):
                p50, p99 = _ms(timings), _ms(timings, 0.99)
                is_server = name == "server"
                table.add_row(
                    name,
                    str(level),
                    f"{p50:.2f}",
                    f"{p99:.2f}",
                    f"{p50 - base50:+.2f}" if is_server else "",
                    f"{p99 - base99:+.2f}" if is_server else "",
                    f"{len(timings) / wall:.0f}",
                    f"{cpu_ms:.2f}" if is_server else "",
                )
    console.print(table)


STAND_IN_COLUMNS = (
    "path",
    "streams",
    "p50 ms",
    "p99 ms",
    "overhead p50 ms",
    "overhead p99 ms",
    "requests/s",
    "server CPU ms/request",
)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stand-in", action="store_true", help="the service's own overhead")
    parser.add_argument("--requests", type=int, default=2000, help="per row (--stand-in)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    arguments = parser.parse_args()
    if arguments.stand_in:
        asyncio.run(stand_in_main(arguments.requests, arguments.concurrency or [1, 16, 64]))
    else:
        levels = arguments.concurrency or [1, 16]
        asyncio.run(main(arguments.rounds, arguments.max_tokens, levels))
