"""Tollway: a self-hosted, high-performance LLM API gateway."""

__version__ = "0.1.0"
