"""What differs between the transformers releases moe_infinity supports.

The supported range is stated once, in ``pyproject.toml``'s dependencies, and
read back here from the installed package's metadata. Everything that depends
on which release is installed lives in this module:

* the KV-cache keyword of a model's ``forward``: ``past_key_values`` up to
  transformers 5.24, ``cache`` from 5.25 (the old name still works there, with
  a deprecation warning);
* the calling convention of the experts code the engine's hooks replace
  (:func:`check_experts_forward`). A release that changes it must stop the
  load with an error naming the version, never compute something else;
* the ``dequantize`` option of transformers' FP8 and MXFP4 configs, with which
  it loads a quantized checkpoint's dense weights as the engine dequantizes
  its experts (:func:`dequantizing_config`). A config class that does not keep
  it (it takes unknown keywords silently) stops the load.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

from .errors import UnsupportedError

__all__ = [
    "cache_kwargs",
    "output_cache",
    "transformers_version",
    "supported_range",
    "check_experts_forward",
    "dequantizing_config",
]

#: The parameter names (after ``self``) under which the fused experts'
#: ``forward`` of each supported family takes what the runtime passes
#: positionally: the tokens, their experts and their routing weights, one row
#: per token. GPT-OSS names the last two ``router_indices, routing_weights``.
FUSED_EXPERTS_PARAMS = (
    ("hidden_states", "top_k_index", "top_k_weights"),
    ("hidden_states", "router_indices", "routing_weights"),
)


def transformers_version() -> str:
    """The installed transformers release, e.g. ``"5.25.0"``."""
    import transformers

    return transformers.__version__


@lru_cache(maxsize=None)
def supported_range(dist: str = "transformers") -> str:
    """The version range of ``dist`` this package declares (and CI tests),
    read from the installed metadata, e.g. ``">=5.0,<6"``; ``"unknown"`` when
    moe_infinity runs from a source tree that is not installed."""
    from importlib import metadata

    try:
        reqs = metadata.requires("moe_infinity") or []
    except metadata.PackageNotFoundError:
        return "unknown"
    for r in reqs:
        name = r.split(";")[0].strip()
        for i, ch in enumerate(name):
            if ch in "<>=!~ [(":
                if name[:i].strip().lower() == dist:
                    return name[i:].strip()
                break
    return "unknown"


def _versions() -> str:
    return f"transformers {transformers_version()} (moe_infinity supports transformers{supported_range()})"


@lru_cache(maxsize=None)
def _cache_kwarg(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise UnsupportedError(f"{model_cls.__name__}.forward takes neither `cache` nor `past_key_values`; {_versions()}")


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the KV-cache keyword this release's ``forward``
    takes (``cache`` from transformers 5.25, ``past_key_values`` before)."""
    return {_cache_kwarg(type(model)): cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``out.cache`` from transformers 5.25,
    ``out.past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def check_experts_forward(module: Any, forward: Any) -> None:
    """Raises :class:`UnsupportedError` naming the installed transformers
    version when ``forward`` (the fused experts code the runtime replaces and
    calls on slot views) no longer takes ``(hidden_states, top_k_index,
    top_k_weights)``. The runtime would otherwise feed it arguments whose
    meaning changed."""
    params = [p for p in inspect.signature(forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = tuple(p.name for p in params[1:])
    if names not in FUSED_EXPERTS_PARAMS:
        known = " or ".join(f"({', '.join(n)})" for n in FUSED_EXPERTS_PARAMS)
        raise UnsupportedError(
            f"{type(module).__name__}.forward takes ({', '.join(names)}), not {known}: "
            f"the experts' calling convention changed in {_versions()}"
        )


def dequantizing_config(quant_method: str, weight_block_size: list[int] | None = None) -> Any:
    """transformers' quantization config that loads a pre-quantized ``quant_method``
    checkpoint dequantized (``FineGrainedFP8Config`` / ``Mxfp4Config`` with
    ``dequantize=True``), or :class:`UnsupportedError` naming the version when the
    installed release has no such option."""
    import transformers

    name = {"fp8": "FineGrainedFP8Config", "mxfp4": "Mxfp4Config"}[quant_method]
    cls = getattr(transformers, name, None)
    kw: dict[str, Any] = {"dequantize": True}
    if quant_method == "fp8":
        kw["weight_block_size"] = tuple(weight_block_size or ())
    cfg = cls(**kw) if cls is not None else None
    if cfg is None or getattr(cfg, "dequantize", None) is not True:
        raise UnsupportedError(f"{name} of {_versions()} cannot load {quant_method} checkpoints dequantized (no dequantize option)")
    return cfg
