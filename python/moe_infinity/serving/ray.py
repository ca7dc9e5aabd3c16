"""Replicas of the OpenAI-compatible server on Ray Serve.

Each replica is a Ray actor that loads its own copy of the model (its own
engine, expert cache and, with ``num_gpus=1``, its own GPU) and serves the
same FastAPI app as ``moe-infinity serve`` behind Ray's HTTP proxy, which
spreads requests over the replicas. Replicas may share one trace file
(``trace_path``): each one merges its expert activation matrices into it when
it shuts down.

In Python::

    from ray import serve
    from moe_infinity.serving.ray import deployment

    serve.run(deployment(num_replicas=2, device="cpu"), route_prefix="/")
    # OpenAI API at http://127.0.0.1:8000/v1

From the shell (Ray's ``serve run`` passes ``key=value`` arguments to
:func:`app_builder`)::

    serve run moe_infinity.serving.ray:app_builder num_replicas=2 model=/models/Mixtral-8x7B num_gpus=1
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError, MissingDependencyError

__all__ = ["deployment", "app_builder"]


def deployment(
    model: str | None = None,
    *,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    device: str = "auto",
    device_memory: int | float | str = 0.5,
    cache_policy: str = "priority",
    prefetch: bool = True,
    trace_path: str | None = None,
    max_batch: int = 16,
    max_queue: int = 64,
    batching: str = "auto",
    served_model_name: str | None = None,
    chat_template: str | None = None,
    shutdown_timeout: float = 15.0,
    torch_threads: int | None = None,
    name: str = "moe_infinity",
    max_ongoing_requests: int | None = None,
) -> Any:
    """A bound Ray Serve application: ``num_replicas`` servers of one model.

    Args:
        model: model directory or Hub id in the local cache of every node
            (None: the built-in model).
        num_replicas: replicas (each loads the model).
        num_cpus, num_gpus: Ray resources each replica reserves; give
            ``num_gpus=1`` for a GPU per replica (Ray sets
            ``CUDA_VISIBLE_DEVICES``, so each sees its own as ``cuda:0``).
        device, device_memory, cache_policy, prefetch, trace_path: as in
            ``moe_infinity.from_pretrained``.
        max_batch, max_queue, batching: each replica's scheduler (requests
            decoded together; requests queued before HTTP 429; "auto",
            "stacked" or "threads", see ``Scheduler``).
        served_model_name: the name clients send (default: the model
            directory's name, or "builtin").
        chat_template: a Jinja chat template (the text, not a path).
        shutdown_timeout: seconds a replica's running requests may take to
            finish when it stops (Ray's ``graceful_shutdown_timeout_s`` is
            set 10 s longer, for closing the model and saving the trace).
        torch_threads: torch CPU threads in each replica.
        name: the deployment's name.
        max_ongoing_requests: requests Ray sends one replica at once
            (default: ``max_batch + max_queue``, so the replica's own queue,
            not Ray's, says when it is full).
    """
    if batching not in ("auto", "stacked", "threads"):
        raise InvalidArgumentError(f"batching must be 'auto', 'stacked' or 'threads' (got {batching!r})")
    try:
        from ray import serve
    except ImportError as e:
        raise MissingDependencyError(f"Ray Serve is not installed: pip install 'moe_infinity[serve]' ({e})") from e

    from pathlib import Path

    served = served_model_name or (Path(model).name if model else "builtin")

    def build() -> Any:
        # Runs in each replica when it starts.
        from .scheduler import Scheduler
        from .server import Lifecycle, build_app, load_model

        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        m, tok = load_model(model, device=device, device_memory=device_memory, cache_policy=cache_policy, prefetch=prefetch, trace_path=trace_path)
        try:
            sched = Scheduler(m, max_batch=max_batch, max_queue=max_queue, batching=batching)
        except BaseException:
            m.close()
            raise
        life = Lifecycle(m, sched, shutdown_timeout=shutdown_timeout, owns_model=True)
        # The app's shutdown (Ray runs it when the replica stops) drains the
        # scheduler and closes the model, saving the trace.
        return build_app(m, tok, sched, served, chat_template=chat_template, lifecycle=life)

    class MoEInfinityServer:
        """One replica: the FastAPI app that build() makes."""

    ingress = serve.ingress(build)(MoEInfinityServer)
    dep = serve.deployment(
        ingress,
        name=name,
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests or (max_batch + max_queue),
        graceful_shutdown_timeout_s=shutdown_timeout + 10.0,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    )
    return dep.bind()


_NUMBERS = {"num_replicas": int, "num_cpus": float, "num_gpus": float, "max_batch": int, "max_queue": int, "shutdown_timeout": float, "torch_threads": int, "max_ongoing_requests": int}


def app_builder(args: dict[str, str]) -> Any:
    """For ``serve run moe_infinity.serving.ray:app_builder key=value ...``
    and Serve config files (``import_path`` with ``args``): the keys are
    :func:`deployment`'s arguments."""
    kw: dict[str, Any] = {}
    for k, v in dict(args).items():
        if k in _NUMBERS:
            kw[k] = _NUMBERS[k](v)
        elif k == "prefetch":
            kw[k] = str(v).lower() not in ("0", "false", "no", "off")
        else:
            kw[k] = v
    return deployment(**kw)
