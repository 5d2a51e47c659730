"""Run a real ASGI app on a loopback port in a background thread, for the tests."""

from coheara.server.background import free_port
from coheara.server.background import serve_in_thread as serve

__all__ = ["free_port", "serve"]
