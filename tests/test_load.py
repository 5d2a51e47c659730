"""A bounded flood over loopback: 300 clients at once against a small cap.

The app (audit on) sits in front of a stand-in runtime that takes 30 ms a call, with 4
slots and a queue of 24, so most of each wave is refused. Checked: no crash and no 5xx;
every refusal is a 429 with Retry-After; every 200 is the answer to its own request;
the backend never had more than the cap in flight; every admitted request is audited as
ok and every refusal as server_busy; and a second wave leaves memory where the first
left it (nothing piles up).
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import httpx

from coheara import Engine, Settings
from coheara.audit import AuditLog
from coheara.server import create_app
from fakes.stand_in import StandIn
from servers import serve

CLIENTS = 300
SLOTS = 4
QUEUE = 24
WAVES = 2


def rss_bytes() -> int:
    """This process's resident memory (Linux), the server thread included."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * 4096


async def wave(url: str, offset: int) -> list[tuple[int, httpx.Response]]:
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(i: int) -> tuple[int, httpx.Response]:
            if i % 3 == 0:  # a third through the OpenAI dialect
                body = {"model": "medgemma", "messages": [{"role": "user", "content": f"ping {i}"}]}
                return i, await client.post("/v1/chat/completions", json=body)
            return i, await client.post("/v1/generate", json={"prompt": f"ping {i}"})

        return await asyncio.gather(*(one(offset + i) for i in range(CLIENTS)))


def text_of(i: int, response: httpx.Response) -> str:
    body = response.json()
    return body["choices"][0]["message"]["content"] if i % 3 == 0 else body["text"]


def test_a_flood_is_capped_refused_cleanly_answered_correctly_and_audited(
    tmp_path: Path,
) -> None:
    backend = StandIn(delay_s=0.03)
    log = AuditLog.open(tmp_path / "a.sqlite3")
    settings = Settings(max_concurrency=SLOTS, max_queue=QUEUE, queue_timeout_s=30)
    app = create_app(Engine(backend, settings), audit=log)
    statuses: collections.Counter[int] = collections.Counter()
    memory: list[int] = []
    try:
        with serve(app) as url:
            for n in range(WAVES):
                results = asyncio.run(wave(url, n * CLIENTS))
                memory.append(rss_bytes())
                for i, response in results:
                    statuses[response.status_code] += 1
                    if response.status_code == 200:
                        assert text_of(i, response) == f"pong ping {i}"
                    else:
                        assert response.status_code == 429, response.text
                        assert int(response.headers["Retry-After"]) >= 1
                        assert response.json()["error"]["code"] == "server_busy"
            assert (app.state.admission.in_flight, app.state.admission.waiting) == (0, 0)
        assert log.flush()
        store = log.reader()
        try:
            outcomes = collections.Counter(r.outcome for r in store.iter_records())
        finally:
            store.close()
    finally:
        log.close()
    assert set(statuses) == {200, 429}, statuses
    assert statuses[200] >= WAVES * (SLOTS + QUEUE)  # at least each wave's first 28 got in
    assert statuses[200] + statuses[429] == WAVES * CLIENTS
    assert backend.peak == SLOTS
    assert backend.completed == statuses[200]
    assert outcomes == {"ok": statuses[200], "server_busy": statuses[429]}
    growth = memory[-1] - memory[0]
    assert growth < 64 * 1024 * 1024, f"memory grew by {growth / 2**20:.0f} MiB in one wave"
