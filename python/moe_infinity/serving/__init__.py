"""Serving an offloaded model to many clients: continuous batching
(:class:`Scheduler`) and an OpenAI-compatible HTTP server."""

from .scheduler import Event, Request, SamplingParams, Scheduler

__all__ = ["Event", "Request", "SamplingParams", "Scheduler"]
