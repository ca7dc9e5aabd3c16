"""Loading Hugging Face models with their routed experts owned by the engine.

``from_pretrained`` builds the transformers model with every routed expert
parameter removed *before* the weights are loaded, so transformers reads only
the dense weights (the expert tensors in the checkpoint become "unexpected
keys" that are never materialised); the engine maps the checkpoint itself and
serves the experts from its cache. ``offload`` does the same for a model
already in memory, registering its expert tensors with the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import sys
import tempfile
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._compat import check_experts_forward, dequantizing_config
from .engine import Engine
from .errors import BudgetError, CheckpointFormatError, EngineIOError, InvalidArgumentError, MoEInfinityError, NotFoundError, StateError, UnsupportedError
from .families import Family, family_for
from .memory import format_bytes, host_memory_bytes, parse_memory
from .runtime import MoELayer, OffloadRuntime, SlotLinear, layout_spec, with_progress

log = logging.getLogger("moe_infinity")

__all__ = ["from_pretrained", "offload", "MoE", "DEFAULT_DEVICE_MEMORY"]

#: Default expert-cache budget: half of the device's memory.
DEFAULT_DEVICE_MEMORY = 0.5

_EXPERTS_SUFFIX = ".experts"


# -- discovering and stripping experts ------------------------------------------


def _experts_modules(model: torch.nn.Module, family: Family) -> list[tuple[str, torch.nn.Module]]:
    """The routed-experts modules of a model, in execution (registration) order."""
    out = []
    for name, mod in model.named_modules():
        if not (name == "experts" or name.endswith(_EXPERTS_SUFFIX)):
            continue
        if family.style == "fused":
            if any(r.name in mod._parameters or hasattr(mod, "_moe_meta") for r in family.regions):
                out.append((name, mod))
        elif isinstance(mod, torch.nn.ModuleDict) and any(k.startswith("expert_") for k in mod.keys()):
            out.append((name, mod))
    return out


def _moduledict_experts(mod: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The ``expert_{i}`` children of a ModuleDict experts module."""
    return [(k, m) for k, m in mod.named_children() if k.startswith("expert_")]


def _strip(model: torch.nn.Module, family: Family) -> None:
    """Removes every routed expert parameter, recording shapes and dtypes in
    ``module._moe_meta`` (region -> (per-expert shape, dtype))."""
    for name, mod in _experts_modules(model, family):
        _strip_module(model, name, mod, family)


def _strip_module(model: torch.nn.Module, name: str, mod: torch.nn.Module, family: Family) -> None:
    """_strip for one experts module ``mod`` (called ``name`` in ``model``)."""
    meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if family.style == "fused":
        for r in family.regions:
            p = mod._parameters.pop(r.name, None)
            if p is None:
                raise UnsupportedError(f"{type(mod).__name__} has no parameter {r.name!r}; this transformers version is not supported")
            meta[r.name] = (tuple(p.shape[1:]), p.dtype)
    else:
        for key, expert in _moduledict_experts(mod):
            expert._is_hf_initialized = True
            for lin_name in family.linears:
                lin = getattr(expert, lin_name)
                lin._is_hf_initialized = True  # nothing left for transformers to initialise
                for pname in ("weight", "bias"):
                    p = lin._parameters.pop(pname, None)
                    if p is not None and key == "expert_0":
                        meta[f"{lin_name}.{pname}"] = (tuple(p.shape), p.dtype)
    mod._moe_meta = meta
    # transformers initialises modules whose weights were not loaded;
    # these have none left, and must not be given any. Some models (Switch)
    # initialise experts from the MoE block that owns them: skip it too (its
    # router weights are loaded from the checkpoint anyway).
    mod._is_hf_initialized = True
    if family.style == "moduledict" and "." in name:
        model.get_submodule(name.rsplit(".", 1)[0])._is_hf_initialized = True


def _model_class(config: Any, family: Family) -> type:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if family.seq2seq else AutoModelForCausalLM
    try:
        return auto._model_mapping[type(config)]
    except KeyError as exc:
        raise UnsupportedError(f"no {auto.__name__} class for config {type(config).__name__}") from exc


def _stripped_class(base: type, family: Family) -> type:
    """A subclass of ``base`` whose instances drop their expert parameters
    right after construction (before any weight is loaded)."""

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        _strip(self, family)

    ignore = list(getattr(base, "_keys_to_ignore_on_load_unexpected", None) or []) + [r"\.experts\."]
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__, "_keys_to_ignore_on_load_unexpected": ignore})


# -- resolving paths --------------------------------------------------------------


def _resolve(name_or_path: str | os.PathLike[str], hf_kwargs: dict[str, Any]) -> Path:
    """A local directory for a path or a Hub id (from the local HF cache
    when HF_HUB_OFFLINE=1 or the id is not reachable)."""
    p = Path(os.fspath(name_or_path)).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise InvalidArgumentError(f"{p} is a file; pass the model's directory (config.json + safetensors)")
    name = os.fspath(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise NotFoundError(f"model directory {p} does not exist")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or hf_kwargs.get("local_files_only", False)
    try:
        return Path(
            snapshot_download(
                name,
                revision=hf_kwargs.get("revision"),
                cache_dir=hf_kwargs.get("cache_dir"),
                local_files_only=offline,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"],
            )
        )
    except Exception as exc:  # noqa: BLE001 — huggingface_hub raises many types
        raise NotFoundError(
            f"cannot find {name!r} as a local directory or in the Hugging Face cache ({type(exc).__name__}: {exc})"
        ) from exc


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) picks the GPU when one is usable and the CUDA
    build of the engine is loaded, the CPU otherwise."""
    from . import _native

    if device is None or device == "auto":
        if torch.cuda.is_available() and _native.variant() == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedError("device='cuda' but torch sees no usable GPU")
        if _native.variant() != "cuda":
            raise UnsupportedError(
                f"device='cuda' needs the CUDA build of the engine, but {_native.library_path()} is the CPU build "
                "(build it with `make cuda` or reinstall with CUDA headers available)"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise UnsupportedError(f"device {dev} is not supported (cpu, cuda)")
    return dev


def _device_total(device: torch.device) -> int:
    """Total memory of the device in bytes (NVML's number for GPUs)."""
    if device.type == "cpu":
        return host_memory_bytes()
    from . import _native

    total, _ = _native.device_memory(device.index or 0)
    return total


#: GPU memory kept free for activations and the KV cache: this fraction of
#: device_memory, but at least WORKSPACE_MIN bytes.
WORKSPACE_FRACTION = 0.02
WORKSPACE_MIN = 256 << 20


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def _cache_budget(device_memory: int, model: torch.nn.Module, device: torch.device, slot_bytes: Callable[[], int]) -> int:
    """Bytes left for the expert cache. On a GPU, device_memory covers the
    dense weights and a workspace too; on the CPU it is all cache.
    ``slot_bytes`` asks the engine for one expert slot's size."""
    if device.type == "cpu":
        return device_memory
    dense = _model_bytes(model)
    workspace = max(WORKSPACE_MIN, int(WORKSPACE_FRACTION * device_memory))
    left = device_memory - dense - workspace
    slot = slot_bytes()
    if left < slot:
        raise BudgetError(
            f"device_memory={format_bytes(device_memory)} ({device_memory} bytes) must hold the dense weights "
            f"({format_bytes(dense)}), a workspace for activations ({format_bytes(workspace)}) and at least one expert slot "
            f"({format_bytes(slot)}); raise device_memory to at least {dense + workspace + slot} bytes"
        )
    return left


# -- offload directory -------------------------------------------------------------


def _fingerprint(path: Path, config: Any) -> str:
    """Identifies a model version: its config and its safetensors files
    (names, sizes and the first 64 KiB of each, which hold the headers)."""
    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()


def _writable_dir(directory: Path, setting: str) -> None:
    """Creates ``directory`` if needed and proves a file can be written in it,
    so that a path the engine would only write at ``close()`` fails now, at
    load, with the setting named — not after generation has run."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".moe_infinity-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EngineIOError(f"{setting}: cannot write in {directory} ({e.strerror or e}); choose a writable directory") from e


def _check_trace_path(trace_path: Path | None, dir_checked: bool = False) -> None:
    """A trace file that exists must be a file; its directory must be writable
    (the trace is written there at ``close()``, by atomic rename), which is
    probed unless the caller just did (``dir_checked``)."""
    if trace_path is None:
        return
    if trace_path.is_dir():
        raise EngineIOError(f"trace_path: {trace_path} is a directory; give a file path such as {trace_path / 'trace.bin'}")
    if not dir_checked:
        _writable_dir(trace_path.parent, "trace_path")


def _prepare_offload_dir(offload_dir: Path, fingerprint: str, trace_path: Path | None) -> Path:
    """Creates offload_dir (or checks it belongs to this model) and returns
    the trace path to use. A directory made for another model or another
    version of it is detected by its fingerprint: its trace is discarded
    (rebuilt from scratch) with a warning, never silently reused."""
    _writable_dir(offload_dir, "offload_dir")
    stamp = offload_dir / "moe_infinity.json"
    trace = trace_path or offload_dir / "trace.bin"
    if stamp.exists():
        try:
            old = json.loads(stamp.read_text()).get("fingerprint")
        except (OSError, ValueError):
            old = None
        if old != fingerprint:
            warnings.warn(
                f"offload_dir {offload_dir} was made for another model (or another version of it); "
                "its trace is discarded and rebuilt",
                stacklevel=3,
            )
            if trace.exists() and trace_path is None:
                trace.unlink()
    tmp = stamp.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "format": 1}))
        os.replace(tmp, stamp)
    except OSError as e:
        raise EngineIOError(f"offload_dir: cannot write {stamp} ({e.strerror or e})") from e
    _check_trace_path(trace, dir_checked=trace.parent == offload_dir)
    return trace


# -- wiring ----------------------------------------------------------------------------


def _layers_for(model: torch.nn.Module, family: Family, engine_modules: list[dict[str, Any]], base_prefix: str) -> list[MoELayer]:
    """Matches the model's experts modules with the engine's checkpoint modules."""
    by_prefix = {m["prefix"]: m for m in engine_modules}
    layers = []
    for path, mod in tqdm(_experts_modules(model, family), desc="Mapping MoE layers", unit="layer", leave=False, disable=None):
        owner = path[: -len(_EXPERTS_SUFFIX)] if path.endswith(_EXPERTS_SUFFIX) else ""
        cands = []
        for c in family.checkpoint_prefixes(owner):
            cands += [c, f"{base_prefix}.{c}" if base_prefix else c]
            if base_prefix and c.startswith(base_prefix + "."):
                cands.append(c[len(base_prefix) + 1 :])
        prefix = next((c for c in cands if c in by_prefix), None)
        if prefix is None:
            raise StateError(
                f"no expert tensors for {path} in the checkpoint (looked for {', '.join(dict.fromkeys(cands))}; "
                f"found {', '.join(by_prefix) or 'none'})"
            )
        if family.style == "moduledict":
            n = len(_moduledict_experts(mod))
        else:
            n = mod.num_experts
        layers.append(MoELayer(index=len(layers), path=path, prefix=prefix, module=mod, num_experts=int(n)))
    if not layers:
        raise UnsupportedError("the model has no routed experts modules to offload")
    return layers


def _region_meta(layers: list[MoELayer]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    meta = layers[0].module._moe_meta
    for layer in layers[1:]:
        if layer.module._moe_meta != meta:
            raise UnsupportedError(f"{layer.path} has experts shaped differently from {layers[0].path}")
    return meta


def _install(model: torch.nn.Module, rt: OffloadRuntime, family: Family) -> None:
    """Routes every MoE layer through the runtime and adds the model-level API."""
    for layer in rt.layers:
        mod = layer.module
        if family.style == "fused":
            original = getattr(type(mod).forward, "__wrapped__", type(mod).forward)
            check_experts_forward(mod, original)

            def fused_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, _layer: MoELayer = layer, _orig: Any = original) -> torch.Tensor:
                return rt.run_fused(_layer, hidden_states, top_k_index, top_k_weights, _orig)

            mod.forward = types.MethodType(fused_forward, mod)
        else:
            for key, expert in _moduledict_experts(mod):
                e = int(key.removeprefix("expert_"))
                for lin_name in family.linears:
                    lin = getattr(expert, lin_name)
                    has_bias = f"{lin_name}.bias" in mod._moe_meta
                    setattr(expert, lin_name, SlotLinear(rt, layer.index, e, lin_name, lin.in_features, lin.out_features, has_bias))
            original = type(mod).forward

            def dict_forward(self: Any, hidden_states: torch.Tensor, mask: torch.Tensor, *rest: Any, _layer: MoELayer = layer, _orig: Any = original) -> torch.Tensor:
                return rt.run_moduledict(_layer, _orig, hidden_states, mask, *rest)

            mod.forward = types.MethodType(dict_forward, mod)

    # Every top-level forward outside generate() is one traced request.
    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        rt.check_open()
        if rt.active_requests() is None:
            ctx = rt.requests(_rows(args, kwargs))
            ctx.__enter__()
            stack = rt._tls.__dict__.setdefault("forward_ctx", [])
            stack.append(ctx)
        else:
            rt._tls.__dict__.setdefault("forward_ctx", []).append(None)
        ls = rt.lockstep
        if ls is not None and ls.enrolled():
            ls.begin_forward()

    def post_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        ls = rt.lockstep
        if ls is not None and ls.enrolled():
            ls.end_forward()
        stack = rt._tls.__dict__.get("forward_ctx") or []
        ctx = stack.pop() if stack else None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)

    orig_generate = model.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        rt.check_open()
        with rt.requests(_rows(args, kwargs)):
            return orig_generate(*args, **kwargs)

    generate.__doc__ = orig_generate.__doc__
    model.generate = generate
    model.moe_runtime = rt
    model.moe_stats = rt.stats
    model.moe_engine = rt.engine

    def reset_moe_stats() -> None:
        rt.check_open()
        rt.engine.reset_stats()
        rt.hook_ns = rt.wait_ns = rt.hook_calls = 0
        rt.phase_ns.clear()

    def save_moe_trace(path: str | os.PathLike[str]) -> None:
        rt.check_open()
        rt.engine.save_trace(path)

    model.reset_moe_stats = reset_moe_stats

    def moe_tune(
        *,
        cache_policy: str | None = None,
        prefetch: bool | None = None,
        graph_misses: str | None = None,
        cpu_experts: str | int | None = None,
        kernel_max_tokens: int | None = None,
        flush: bool = False,
        reset_stats: bool = False,
    ) -> None:
        """Changes the cache policy or prefetching of the loaded model, how
        the next captured CUDA-graph step gets missed experts
        (``graph_misses``: "auto", "read" or "copy"; recapture after it),
        pauses (``cpu_experts="off"``) or resumes (``"auto"``, or a
        thread count: the CPU side measured again on that many threads,
        ``["cpu_threads"]``) the CPU's part in computing experts
        (``moe_stats()["plan"]["executor"]["hybrid"]``; recapture after
        it), sets the kernel crossover (``kernel_max_tokens``: the most
        tokens for which the expert kernels beat transformers' code, as
        ``moe_runtime.probe_kernel_crossover()`` measures at load on a GPU;
        0 for the engine's default), empties the cache (``flush``) or
        zeroes the statistics, without reloading."""
        rt.tune(policy=cache_policy, prefetch=prefetch, graph_misses=graph_misses, cpu_experts=cpu_experts,
                kernel_max_tokens=kernel_max_tokens, flush=flush, reset_stats=reset_stats)

    model.moe_tune = moe_tune
    model.save_moe_trace = save_moe_trace
    model.close = rt.close
    weakref.finalize(model, _close_unclosed, rt)


def _close_unclosed(rt: OffloadRuntime) -> None:
    """Closes a model nobody closed (garbage collection, interpreter exit).
    A finalizer has no caller to raise to: a failure (say, a trace whose
    directory was removed meanwhile) becomes one warning line instead of an
    "Exception ignored" traceback."""
    try:
        rt.close()
    except MoEInfinityError as e:
        try:
            sys.stderr.write(f"moe_infinity: closing an unclosed model: {e}\n")
        except Exception:  # noqa: BLE001 — stderr may be gone at exit
            pass


def _rows(args: tuple, kwargs: dict) -> int:
    """The batch size of a forward/generate call."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "input_features"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0]) if t.dim() > 1 else 1
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1:
            return int(a.shape[0]) if a.dim() > 1 else 1
    return 1


def _budget(device_memory: Any, device: torch.device) -> int:
    """device_memory in bytes. On a GPU it must fit the memory free now:
    asking for more is an error at once, naming both numbers, not an
    out-of-memory failure after the dense weights were loaded."""
    if device.type == "cpu":
        return parse_memory(device_memory, _device_total(device))
    from . import _native

    total, free = _native.device_memory(device.index or 0)
    budget = parse_memory(device_memory, total)
    if budget > free:
        raise BudgetError(
            f"device_memory={format_bytes(budget)} ({budget} bytes) but only {format_bytes(free)} ({free} bytes) of the "
            f"{format_bytes(total)} on {device} are free; lower device_memory to at most {free} bytes or free GPU memory"
        )
    return budget


def _engine(budget: int, cache_policy: str, prefetch: bool, trace_path: Path | None, engine_options: dict[str, Any], device: torch.device) -> Engine:
    backend = "cuda" if device.type == "cuda" else "cpu"
    return Engine(budget_bytes=budget, policy=cache_policy, prefetch=prefetch, trace_path=trace_path, backend=backend, device=device.index or 0, **engine_options)


def _finish(model: torch.nn.Module, engine: Engine, family: Family, base_prefix: str, device: torch.device, device_memory: int, kernels: bool, quant: dict[str, Any] | None = None) -> torch.nn.Module:
    modules = engine.modules()
    if not modules:
        raise UnsupportedError("no routed expert tensors found in the checkpoint")
    layers = _layers_for(model, family, modules, base_prefix)
    fused_on_disk = by_prefix_fused(modules, layers)
    meta = _region_meta(layers)
    layer_names = [layer.prefix for layer in layers]
    budget = _cache_budget(device_memory, model, device, lambda: engine.slot_plan(layout_spec(family, meta, fused_on_disk, quant), layer_names)["slot_bytes"])
    with _byte_progress("Pinning experts") as progress:
        rt = OffloadRuntime(
            engine, family, layers, meta, fused_on_disk,
            device=device, budget_bytes=budget, kernels=kernels, progress=progress if device.type == "cuda" else None, quant=quant,
        )
    _install(model, rt, family)
    if device.type == "cuda" and rt.kernels and rt.plan["executor"].get("kernels") and family.style == "fused":
        _probe_crossover(rt)
    plan = rt.plan
    log.info(
        "moe_infinity: %d MoE layers x %d experts; cache of %d slots x %s = %s (%s policy, prefetch %s)",
        len(layers),
        rt.num_experts,
        plan["slots"],
        format_bytes(plan["slot_bytes"]),
        format_bytes(plan["arena_bytes"]),
        plan["policy"],
        "on" if plan["prefetch"] else "off",
    )
    for w in plan.get("warnings") or []:
        warnings.warn(f"moe_infinity: {w}", stacklevel=3)
    return model


def _probe_crossover(rt: OffloadRuntime) -> None:
    """The kernel crossover of this GPU and model, measured at load
    (OffloadRuntime.probe_kernel_crossover) and given to the engine; where
    the probe fails the engine keeps its default, with a warning saying
    why."""
    try:
        p = rt.probe_kernel_crossover()
    except MoEInfinityError as e:
        warnings.warn(f"moe_infinity: the kernel crossover could not be measured, the default stays: {e}", stacklevel=4)
        return
    log.info(
        "moe_infinity: expert kernels take layer calls of up to %d tokens (measured: %s)",
        p["kernel_max_tokens"],
        ", ".join(f"{T} tokens {k * 1e3:.2f} ms vs transformers {t * 1e3:.2f} ms" for T, k, t in zip(p["tokens"], p["kernel_s"], p["torch_s"])),
    )


def _file_mapped_ranges(files: list[Path]) -> list[tuple[int, int]]:
    """The address ranges of this process mapped from ``files`` (matched by
    device and inode in /proc/self/maps; empty where that is unavailable)."""
    ids = set()
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        ids.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    out = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) < 5 or parts[4] == "0":
                    continue
                major, _, minor = parts[3].partition(":")
                if (int(major, 16), int(minor, 16), int(parts[4])) in ids:
                    lo, _, hi = parts[0].partition("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return out


def _copy_out_of_files(model: torch.nn.Module, files: list[Path]) -> int:
    """Gives every CPU parameter and buffer that transformers left as a view
    of a checkpoint file's memory mapping (safetensors maps the file and
    torch reads it in place) its own copy; returns how many were copied.

    Torch reading such a view after the file is truncated on disk (``cp
    new.safetensors old.safetensors``, ``rsync --inplace``, a full disk)
    dies with SIGBUS, which no Python code can catch; a copy never faults.
    The experts are the engine's: it reads the file under a guard and
    checks the file's identity, raising CheckpointChangedError instead.
    The copy costs the dense (non-expert) weights once in anonymous memory
    on a CPU model; a GPU model's weights are already on the device."""
    ranges = _file_mapped_ranges(files)
    if not ranges:
        return 0
    copied = 0
    with torch.no_grad():
        tensors = itertools.chain(model.named_parameters(), model.named_buffers())
        for _, t in tensors:
            if t.device.type != "cpu" or t.numel() == 0:
                continue
            ptr = t.data_ptr()
            if any(lo <= ptr < hi for lo, hi in ranges):
                t.data = t.data.clone()
                copied += 1
    return copied


def by_prefix_fused(modules: list[dict[str, Any]], layers: list[MoELayer]) -> bool:
    """Whether the checkpoint keeps the layers' experts fused (3D tensors)."""
    by_prefix = {m["prefix"]: m for m in modules}
    kinds = {bool(by_prefix[layer.prefix]["fused"]) for layer in layers}
    if len(kinds) != 1:
        raise UnsupportedError("the checkpoint mixes fused and per-expert layouts across MoE layers")
    return kinds.pop()


def _check_expert_count(config: Any, family: Family, modules: list[dict[str, Any]]) -> None:
    """Refuses a checkpoint whose MoE layers have another number of experts
    than the config says, before transformers loads anything."""
    want = getattr(config, family.num_experts_attr, None)
    for m in modules:
        if want is not None and m["num_experts"] != want:
            role = m["roles"][0] if m["roles"] else {}
            raise CheckpointFormatError(
                f"{role.get('source', 'checkpoint')}: MoE module {m['prefix']!r} has {m['num_experts']} experts "
                f"(e.g. tensor \"{role.get('tensor', '?')}\") but config.{family.num_experts_attr} is {want}"
            )


# -- quantization --------------------------------------------------------------------------

#: quant_method values of checkpoints served as they ship (on the CPU): the engine keeps
#: their experts compressed and dequantizes them bit for bit as transformers does.
SERVED_QUANT_METHODS = ("fp8", "mxfp4")

#: transformers keyword arguments that quantize a model at load time.
_QUANTIZING_KWARGS = ("quantization_config", "load_in_8bit", "load_in_4bit")

_SERVED = (
    "moe_infinity serves unquantized checkpoints (float32, float16 or bfloat16 experts) and, on the CPU "
    "(device='cpu'), fp8 (block-scaled, with weight_block_size) and mxfp4 checkpoints as they ship"
)


def _quant_method(qc: Any) -> str:
    """The quant_method of a quantization_config (a dict or a transformers config object)."""
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    return str(method) if method is not None else "unknown"


def _check_quantization(config: Any, hf_kwargs: dict[str, Any] | None = None, device: torch.device | None = None) -> dict[str, Any] | None:
    """The layout facts of a checkpoint quantized in a format moe_infinity serves
    (``{"quant_method": "fp8", "weight_block_size": [128, 128]}``, ``{"quant_method": "mxfp4"}``),
    None for an unquantized one; UnsupportedError naming what is found and what is served for
    any other quantization and for a request to quantize at load time. How the experts are
    computed (dequantized views for transformers' code, or the engine's FP8 kernels) is the
    engine's choice.

    ``device`` is None for a model already in memory (``offload``), whose quantized weights are
    not the checkpoint's: every quantization is refused there.
    """
    for key in _QUANTIZING_KWARGS:
        if hf_kwargs and hf_kwargs.get(key) not in (None, False):
            raise UnsupportedError(f"{key}= quantizes the model at load time, which is not supported: {_SERVED}")
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = _quant_method(qc)
    if method not in SERVED_QUANT_METHODS:
        raise UnsupportedError(f"the checkpoint is quantized with quant_method={method!r}, which is not supported: {_SERVED}")
    if device is None:
        raise UnsupportedError(f"offload() takes a model whose experts are unquantized; this one is quantized (quant_method={method!r}): load the checkpoint with moe_infinity.from_pretrained instead")
    get = qc.get if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))
    if method == "mxfp4":
        return {"quant_method": method}
    block = get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UnsupportedError(
            f"the checkpoint is quantized with quant_method='fp8' but quantization_config.weight_block_size is {block!r}: "
            f"only block-scaled FP8 (weight_block_size [rows, cols], as DeepSeek-V3 and Qwen3-FP8 ship) is served"
        )
    return {"quant_method": method, "weight_block_size": [int(b) for b in block]}


#: expert_dtype values: None or "auto" serve the experts in the checkpoint's own dtype; "fp8"
#: compresses float routed experts to block FP8 (from_pretrained: once, into offload_dir;
#: offload: in host memory).
EXPERT_DTYPES = (None, "auto", "fp8")

#: The subdirectory of offload_dir holding the FP8 copy of the experts.
FP8_EXPERTS_DIR = "experts-fp8"


def _check_expert_dtype(expert_dtype: Any) -> bool:
    """Whether ``expert_dtype`` asks for compression to FP8; InvalidArgumentError
    naming the valid values for anything else."""
    if not (expert_dtype is None or isinstance(expert_dtype, str)) or expert_dtype not in EXPERT_DTYPES:
        raise InvalidArgumentError(
            f"expert_dtype={expert_dtype!r} is not supported; valid values: None or 'auto' (the checkpoint's own dtype), "
            "'fp8' (compress the routed experts to block FP8: from_pretrained once into offload_dir, offload in memory)"
        )
    return expert_dtype == "fp8"


def _check_compressible(config: Any, offload_dir: Any) -> None:
    """The conditions of expert_dtype='fp8' in from_pretrained: an unquantized checkpoint and an
    offload_dir."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        raise InvalidArgumentError(
            f"expert_dtype='fp8' compresses an unquantized (float) checkpoint, but this one is already quantized "
            f"(quant_method={_quant_method(qc)!r}); leave expert_dtype unset to serve it as it ships"
        )
    if offload_dir is None:
        raise InvalidArgumentError(
            "expert_dtype='fp8' writes the compressed experts once, into offload_dir (reused by later loads); pass offload_dir=..."
        )


@contextlib.contextmanager
def _byte_progress(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done, total)`` callback (bytes) drawing a tqdm bar from
    its first report on; the bar is closed when the block ends."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None)
        bar.n = done
        bar.refresh()

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def _compress_experts(engine: Engine, path: Path, offload_dir: Path, fingerprint: str) -> dict[str, Any]:
    """Has the engine make (or reuse) the FP8 copy of the checkpoint's experts in offload_dir
    and map it; returns the quantization the engine then serves."""
    with _byte_progress("Compressing experts to FP8") as progress:
        res = with_progress(engine, lambda: engine.add_compressed(path, offload_dir / FP8_EXPERTS_DIR, fingerprint), progress)
    log.info(
        "moe_infinity: FP8 experts %s %s (%s from %s)",
        "reused from" if res["reused"] else "written to",
        res["dir"],
        format_bytes(res["bytes"]),
        format_bytes(res["source_bytes"]),
    )
    return {"quant_method": res["quant_method"], "weight_block_size": list(res["weight_block_size"])}


# -- public API --------------------------------------------------------------------------


def from_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    device_memory: int | float | str = DEFAULT_DEVICE_MEMORY,
    offload_dir: str | os.PathLike[str] | None = None,
    trace_path: str | os.PathLike[str] | None = None,
    cache_policy: str = "priority",
    prefetch: bool = True,
    dtype: Any = None,
    device: str | torch.device | None = "auto",
    kernels: bool = True,
    engine_options: dict[str, Any] | None = None,
    expert_dtype: str | None = None,
    **hf_kwargs: Any,
) -> Any:
    """Loads a Mixture-of-Experts model with its routed experts served by moe_infinity.

    Returns the ``transformers`` model itself (``generate``, ``forward``,
    ``.config``, ``.device``, pipelines all work) with extra methods
    ``moe_stats()``, ``reset_moe_stats()``, ``save_moe_trace(path)`` and
    ``close()``.

    Args:
        name_or_path: a local model directory, or a Hub id already in the
            local Hugging Face cache (``HF_HUB_OFFLINE=1`` works).
        device_memory: budget of the expert cache: bytes (int), a string
            such as ``"24GiB"`` / ``"500MB"``, or a fraction of the device's
            memory (float in (0, 1]; on CPU, of the host's RAM).
        offload_dir: directory for moe_infinity's files about this model
            (the trace file unless ``trace_path`` is given, a fingerprint
            that detects a directory made for another model, and with
            ``expert_dtype="fp8"`` the compressed experts in ``experts-fp8/``).
        trace_path: expert-activation trace file, loaded at start and written
            at ``close()``.
        cache_policy: ``"priority"`` (activation-aware, default), ``"lru"``, ``"lfu"``.
        prefetch: trace-driven prefetching on (default) or off.
        dtype: torch dtype of the model (passed to transformers; experts are
            converted to it in the cache).
        device: ``"auto"`` (the GPU when one is usable and the CUDA build of
            the engine is installed, else the CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``. On a GPU the dense weights live there too and
            ``device_memory`` covers them, a workspace and the cache.
        kernels: on a GPU, compute bfloat16/float16 SwiGLU experts of decode
            steps with the engine's fused kernels (default); False keeps
            transformers' own expert code everywhere.
        engine_options: advanced engine settings (``eamc_capacity``,
            ``matches``, ``prefetch_window``, ``workers``, ``max_slots``,
            ``cpu_experts``: ``"auto"`` (default), ``"off"`` or a thread
            count. With a GPU, ``"auto"`` lets the engine compute missed
            experts on the CPU where they lie, on the synchronous kernel
            path and in copy-mode CUDA-graph replays, once the link's rates
            are known (``moe_stats()["plan"]["executor"]``: ``hybrid_off``
            and ``graph_hand_off_off`` say why either is off), on every
            core but two (the engine's own threads keep those). On the CPU, ``"auto"`` is off
            (transformers' code, bitwise); a thread count makes
            bfloat16/float16 SwiGLU decode layers run the engine's SIMD
            expert kernels (outputs then match transformers within
            bfloat16/float16 rounding, not bitwise), and each missed expert
            predicted cold is computed from host memory instead of copied
            for the call, then offered to the cache behind it
            (``moe_stats()``: ``cpu_computed``, ``cpu_seconds``);
            ``model_link``: ``True`` makes the CPU backend's copies take
            as long as ``link_rates`` says (one at a time, the reaction plus
            the bytes at ``dma_gbps``), so that a machine without a GPU
            measures the time the link-bound choices cost, not only their
            counts (needs ``link_rates``);
            ``admit_margin``: in mapped mode, how much more the eviction
            policy must value a missed expert than its victim to copy it
            in, default 1.0; ``graph_misses``: how CUDA-graph decode
            steps get missed experts, ``"read"`` in place, ``"copy"`` by
            the copy engine, default ``"auto"``: the engine compares
            copying (its reaction plus the bytes at the DMA rate) with reading
            in place (the bytes at the zero-copy rate) using the link rates
            ``{"dma_gbps", "zero_copy_gbps", "reaction_us"}`` of this machine,
            which the engine measures at start-up on the GPU (<0.2 s) with
            ``measure_link: True`` (off by default: its reaction leaves out
            the host's first copy call, so measured rates copy experts
            that read faster in place) unless ``link_rates`` gives them; without
            rates (the default, the CPU backend, or a failed measurement)
            it copies from 32 MiB per expert.
            ``moe_stats()["plan"]`` reports them (``link_rates``) and where
            they came from (``link_rates_source``: ``"given"``,
            ``"measured"``, ``"failed"`` or ``"none"``);
            ``quantized_kernels``: how a GPU computes FP8, MXFP4 and
            gpt-oss experts: ``True`` with its kernels, ``False`` with
            transformers' code on dequantized views; left out, FP8
            experts take the kernels and gpt-oss experts the views;
            ``kernel_build``: the CUDA kernels' build, ``"sm80"``
            (default) or ``"sm89"`` (GPUs of compute capability 8.9 and
            up: FP8 experts decoded by the hardware, same results; opt-in
            until checked on a GPU), reported as
            ``moe_stats()["plan"]["kernel_build"]``;
            ``prefetch_confidence``,
            ``prefetch_min_evidence``, ``prefetch_min_token_share``: the
            prefetch planner's filters, 0 = default, negative = off).
        **hf_kwargs: passed to transformers' ``from_pretrained``.
    """
    from transformers import AutoConfig

    compress = _check_expert_dtype(expert_dtype)
    path = _resolve(name_or_path, hf_kwargs)
    config_kwargs = {k: hf_kwargs[k] for k in ("trust_remote_code", "revision") if k in hf_kwargs}
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    family = family_for(getattr(config, "model_type", ""))
    if "device_map" in hf_kwargs:
        raise InvalidArgumentError("device_map is managed by moe_infinity; choose the device with device='cpu' or 'cuda'")
    dev = _resolve_device(device)
    if compress:
        _check_compressible(config, offload_dir)
    quant = _check_quantization(config, hf_kwargs, dev)
    budget = _budget(device_memory, dev)
    if not any(path.glob("*.safetensors")):
        raise NotFoundError(f"{path} has no .safetensors files; moe_infinity reads experts from safetensors checkpoints")
    trace = Path(trace_path) if trace_path else None
    fingerprint = None
    if offload_dir is not None:
        fingerprint = _fingerprint(path, config)
        trace = _prepare_offload_dir(Path(offload_dir), fingerprint, trace)
    else:
        _check_trace_path(trace)
    engine = _engine(budget, cache_policy, prefetch, trace, dict(engine_options or {}), dev)
    try:
        if compress:
            # The experts come from their FP8 copy; transformers loads the dense weights as they are.
            served = _compress_experts(engine, path, Path(offload_dir), fingerprint)
        else:
            engine.add_checkpoint(path)
            served = quant
        _check_expert_count(config, family, engine.modules())
        cls = _stripped_class(_model_class(config, family), family)
        kwargs = dict(hf_kwargs)
        kwargs.pop("local_files_only", None)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if quant is not None:
            kwargs["quantization_config"] = dequantizing_config(quant["quant_method"], quant.get("weight_block_size"))
        if dev.type == "cuda":
            kwargs["device_map"] = {"": dev.index}
        model = cls.from_pretrained(path, config=config, **kwargs)
        model.eval()
        _copy_out_of_files(model, sorted(path.glob("*.safetensors")))
        return _finish(model, engine, family, getattr(model, "base_model_prefix", ""), dev, budget, kernels, served)
    except BaseException:
        engine.close()
        raise


def offload(
    model: torch.nn.Module,
    *,
    device_memory: int | float | str = DEFAULT_DEVICE_MEMORY,
    trace_path: str | os.PathLike[str] | None = None,
    cache_policy: str = "priority",
    prefetch: bool = True,
    device: str | torch.device | None = "auto",
    kernels: bool = True,
    engine_options: dict[str, Any] | None = None,
    expert_dtype: str | None = None,
) -> torch.nn.Module:
    """Hands the routed experts of a model already in memory (for example
    built with ``from_config``) to moe_infinity, in place, and returns it.

    The expert tensors move to (or stay in) host memory, which becomes the
    engine's host tier (pinned in place for the GPU); the model keeps no
    expert parameters. With a GPU the rest of the model moves to it.

    ``expert_dtype="fp8"`` compresses the experts to block FP8 (128 × 128
    blocks, the bytes ``from_pretrained(..., expert_dtype="fp8")`` writes for
    a checkpoint) in host memory the engine owns, layer by layer: each
    layer's float experts are released as soon as it is compressed, so the
    host holds the model's float experts once at most, and afterwards half
    their bytes (bf16). No offload_dir is needed. On a GPU the experts cross
    the link compressed and are dequantized there, as FP8 checkpoints are.
    """
    compress = _check_expert_dtype(expert_dtype)
    family = family_for(getattr(model.config, "model_type", ""))
    _check_quantization(model.config)
    dev = _resolve_device(device)
    budget = _budget(device_memory, dev)
    trace = Path(trace_path) if trace_path else None
    _check_trace_path(trace)
    engine = _engine(budget, cache_policy, prefetch, trace, dict(engine_options or {}), dev)
    try:
        mods = _experts_modules(model, family)
        if not mods:
            raise UnsupportedError("the model has no routed experts modules to offload")
        served = None
        desc = "Compressing experts to FP8" if compress else "Registering experts"
        for path, mod in tqdm(mods, desc=desc, unit="layer", disable=None):
            if family.style == "fused":
                for r in family.regions:
                    p = mod._parameters[r.name]
                    engine.add_host_tensor(f"{path}.{r.name}", p.detach().to("cpu").contiguous())
            else:
                for key, expert in _moduledict_experts(mod):
                    for lin_name in family.linears:
                        lin = getattr(expert, lin_name)
                        for pname, p in lin.named_parameters(recurse=False):
                            engine.add_host_tensor(f"{path}.{key}.{lin_name}.{pname}", p.detach().to("cpu").contiguous())
            p = None
            if compress:
                # The engine holds this layer's FP8 copy now: the float experts go at once.
                owner = path[: -len(_EXPERTS_SUFFIX)] if path.endswith(_EXPERTS_SUFFIX) else path
                res = engine.compress_host(owner)
                served = {"quant_method": res["quant_method"], "weight_block_size": list(res["weight_block_size"])}
                _strip_module(model, path, mod, family)
        return _settle(model, engine, family, dev, budget, kernels, served, strip=not compress)
    except BaseException:
        engine.close()
        raise


def offload_host_experts(
    model: torch.nn.Module,
    experts: Callable[[str], dict[str, torch.Tensor]],
    quant: dict[str, Any] | None,
    *,
    device_memory: int | float | str = DEFAULT_DEVICE_MEMORY,
    device: str | torch.device | None = "auto",
    kernels: bool = True,
    engine_options: dict[str, Any] | None = None,
    cache_policy: str = "priority",
    prefetch: bool = True,
) -> torch.nn.Module:
    """offload() for a model whose experts are given as host tensors in a
    checkpoint's format rather than held by the model (the benchmark's
    MXFP4 presets: gpt-oss-120b's experts in bf16 would not fit host
    memory). ``experts(path)`` returns the experts module ``path``'s tensors
    named as the checkpoint names them under it (``gate_up_proj_blocks``,
    ...); ``quant`` is the checkpoint's quantization (``{"quant_method":
    "mxfp4"}``) or None. The model's expert parameters give the shapes and
    dtype the views have (they may be on the meta device) and are removed."""
    family = family_for(getattr(model.config, "model_type", ""))
    if family.style != "fused":
        raise UnsupportedError(f"offload_host_experts takes fused experts; {family.model_type} keeps them in a ModuleDict")
    dev = _resolve_device(device)
    budget = _budget(device_memory, dev)
    engine = _engine(budget, cache_policy, prefetch, None, dict(engine_options or {}), dev)
    try:
        mods = _experts_modules(model, family)
        if not mods:
            raise UnsupportedError("the model has no routed experts modules to offload")
        for path, mod in tqdm(mods, desc="Registering experts", unit="layer", disable=None):
            for name, t in experts(path).items():
                engine.add_host_tensor(f"{path}.{name}", t.contiguous())
        return _settle(model, engine, family, dev, budget, kernels, quant)
    except BaseException:
        engine.close()
        raise


def _settle(model, engine, family, dev, budget, kernels, quant, *, strip: bool = True) -> torch.nn.Module:
    """The end of offload() and offload_host_experts(), once the engine
    holds every expert: the model's own expert parameters go (``strip``),
    the rest of it moves to ``dev`` in eval mode, and _finish wires the
    engine in."""
    if strip:
        _strip(model, family)
    model.eval()
    if dev.type == "cuda":
        model.to(dev)
    return _finish(model, engine, family, "", dev, budget, kernels, quant)


class MoE:
    """MoE-Infinity's configuration-dict interface, mapped onto :func:`from_pretrained`.

    ``MoE(checkpoint, {"offload_path": "/tmp/offload", "device_memory_ratio": 0.75})``

    Recognised keys: ``offload_path``, ``device_memory_ratio``,
    ``device_memory``, ``trace_path``, ``cache_policy``, ``prefetch``,
    ``eamc_capacity`` (also ``trace_capacity``), ``dtype``, ``expert_dtype``.
    Other keys are rejected with an error listing these.
    """

    _KEYS = {"offload_path", "device_memory_ratio", "device_memory", "trace_path", "cache_policy", "prefetch", "eamc_capacity", "trace_capacity", "dtype", "expert_dtype"}

    def __init__(self, checkpoint: str | os.PathLike[str], config: dict[str, Any] | None = None, **hf_kwargs: Any):
        config = dict(config or {})
        unknown = sorted(set(config) - self._KEYS)
        if unknown:
            raise InvalidArgumentError(f"unknown MoE config keys {unknown}; recognised: {sorted(self._KEYS)}")
        memory = config.get("device_memory", config.get("device_memory_ratio", DEFAULT_DEVICE_MEMORY))
        capacity = config.get("eamc_capacity", config.get("trace_capacity"))
        self.model = from_pretrained(
            checkpoint,
            device_memory=memory,
            offload_dir=config.get("offload_path"),
            trace_path=config.get("trace_path"),
            cache_policy=config.get("cache_policy", "priority"),
            prefetch=config.get("prefetch", True),
            dtype=config.get("dtype"),
            expert_dtype=config.get("expert_dtype"),
            engine_options={"eamc_capacity": capacity} if capacity else None,
            **hf_kwargs,
        )

    @property
    def config(self) -> Any:
        """The transformers config."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.model.device

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``model.generate``; ``input_ids`` may be passed positionally."""
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        return self.model.generate(**kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model.forward``."""
        return self.model(*args, **kwargs)

    __call__ = forward

    def moe_stats(self) -> dict[str, Any]:
        """Engine statistics (see ``model.moe_stats``)."""
        return self.model.moe_stats()

    def close(self) -> None:
        """Frees the engine."""
        self.model.close()

    def __enter__(self) -> MoE:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
