"""The HTTP server: native, OpenAI-compatible and Ollama-compatible dialects over one engine."""

from coheara.server.app import create_app

__all__ = ["create_app"]
