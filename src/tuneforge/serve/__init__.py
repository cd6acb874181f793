"""An OpenAI-compatible HTTP server: one base model, many LoRA adapters, batched across adapters."""

from tuneforge.serve.app import ServeOptions, Server, serve

__all__ = ["ServeOptions", "Server", "serve"]
