"""Run the server on a loopback port, in a thread or its own process (selftest, bench, tests)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_in_thread(
    app: Any, *, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 30.0
) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"server on {host}:{port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def serve_in_process(
    model_dir: str,
    *,
    env: dict[str, str] | None = None,
    capture: bool = False,
    timeout_s: float = 120.0,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`coheara serve` on the Transformers backend in its own process, as deployed.

    Yields the base URL once `/healthz` answers, and the process (its stderr readable
    after the block when `capture` is set).
    """
    port = free_port()
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    command = ["serve", "--backend", "transformers", "--model", model_dir, "--port", str(port)]
    process = subprocess.Popen(
        [sys.executable, "-m", "coheara.cli.main", *command],
        env=env,
        stdout=output,
        stderr=output,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("coheara serve did not start")
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        if not capture:
            process.wait(timeout=30)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
