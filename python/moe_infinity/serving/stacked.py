"""Stacked continuous batching: one forward per decode step for the whole
batch, with each request's numbers exactly what ``generate`` gives it alone.

A decode step stacks every running request's next token into one forward of
the model (one row per request): the Python of the forward runs once per step
instead of once per request, and each MoE layer receives all the step's
tokens, so the engine fetches an expert once for every row routed to it.

Stacking alone would change the numbers. Two things in a forward depend on
the batch:

- a matrix product over several rows does not round each row the way the same
  product over one row does (torch's CPU GEMM differs from M = 2 on, and GPU
  libraries pick other kernels for other shapes), and a GPU reduction over a
  row (a norm's mean) may be split across threads differently for 1 row and
  for 16;
- attention over a padded cache reduces over more positions (masked ones
  included), in another order.

:class:`RowwiseMode` removes both inside the step. It splits every
``torch.nn.functional.linear`` and every reduction over the last dimension
(mean, sum, var, softmax) into one call per request, on that request's slice
of the step's tensor, which has the shape the request's own forward gives the
same call: the norm of a request's ``[1, 1, heads, head_dim]`` query is one
call over all its heads, as alone, not one call per head. Products over
tokens that are not batch-first (an expert's gathered tokens) are split into
one product per token, each the M = 1 product a request's lone token gives
alone. It computes attention row by row over the row's own cache positions
only (below). Everything else in a decoder layer (elementwise work, rotary
embeddings, top-k, the experts' gather and sums) is already row-wise. The
rest of the forward (embedding, mask building, the layers' Python) runs once.

Attention runs in one of two ways, both split by row. ``sdpa``: the mode
intercepts ``scaled_dot_product_attention``. ``eager`` (gpt-oss, whose
attention adds per-head sinks and has no sdpa path): the model's modeling
module calls its own ``eager_attention_forward``, a Python function no
TorchFunctionMode sees, so :class:`StackedBatch` wraps that module-level
function once (:func:`_split_eager`); the wrapper passes every call through
unchanged except in a thread inside an active RowwiseMode, where it calls the
original once per row on the row's own keys, values and mask slice, with the
mode suspended, so the row's attention (sinks included) is computed exactly as
in the request's own forward.

Each request is prefilled alone (its prompt's own forward), then joins the
running batch's cache as a new row, left-padded to the batch's length; rows
leave when their request finishes. A sliding-window layer
(``DynamicSlidingWindowLayer``) keeps the last ``window - 1`` positions of
each row (fewer while the row is shorter), left-padded to the longest row's
kept length, and its position count is the batch's full width, so that
transformers builds its window mask over the same positions as the
full-length layers. In a step a row then reads the last
``min(N, its tokens)`` (this step's included) of an attention call's ``N``
key positions: all its tokens in a full-length layer (N is the longest
row's), and its window in a sliding one (N is the window, or the longest
row's if that is shorter): exactly the keys the request's own decode step
attends to. Supported where
attention is ``sdpa`` or ``eager`` and every layer is a plain full-length or
sliding-window cache layer (checked by :func:`stacked_support`); other
models are decoded by the lockstep threads.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._compat import cache_kwargs
from ..errors import InternalError

__all__ = ["RowwiseMode", "StackedBatch", "stacked_support"]


# Reductions over the last dimension (norms, the router's softmax and
# renormalization) that a GPU library may split differently across threads
# for 1 row and for 16 (split reductions keep an SM busy when rows are
# few), and so round differently: computed per request too, on the shape
# the request's own forward has. Their second positional argument is the
# dimension.
_ROW_REDUCTIONS = frozenset(
    {torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum, torch.var, torch.Tensor.var, F.softmax, torch.softmax, torch.Tensor.softmax}
)


# scaled_dot_product_attention's parameters after query, key and value.
_SDPA_POSITIONAL = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

# The cache layer classes stacked steps know how to stack: transformers'
# plain full-length layer and its sliding-window layer.
_FULL_LAYER = "DynamicLayer"
_SLIDING_LAYER = "DynamicSlidingWindowLayer"

# The RowwiseMode active in this thread (the eager wrapper's only way to
# find it: a TorchFunctionMode sees torch calls, not Python functions).
_active = threading.local()


def _reduces_last_dim(x: Any, args: tuple, kwargs: dict) -> bool:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return False
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    return isinstance(dim, int) and not isinstance(dim, bool) and dim % x.dim() == x.dim() - 1


def _per_row(func: Any, x: torch.Tensor, args: tuple, kwargs: dict, requests: int | None) -> torch.Tensor | None:
    """func over each request's part of x on its own, stacked back; None
    when x holds one request's part only.

    A tensor of the step's own (batch first, ``requests`` rows: hidden
    states, a head-split query) is cut along its first dimension, so each
    call sees the shape the request's own forward gives it. Any other (an
    expert's gathered tokens, ``[tokens, hidden]``) is cut into rows of its
    last dimension: each token is one request's lone token."""
    if requests is not None and requests > 1 and x.shape[0] == requests:
        parts = [x[i : i + 1] for i in range(requests)]
        shape = None
    else:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 1
        if rows <= 1:
            return None
        flat = x.reshape(rows, x.shape[-1])
        parts = [flat[i : i + 1] for i in range(rows)]
        shape = x.shape[:-1]
    # A fresh tensor per part: a view into the stack would differ from the
    # request's own input in alignment, which some kernels round by.
    out = torch.cat([func(p.clone(), *args[1:], **kwargs) for p in parts])
    return out if shape is None else out.reshape(*shape, *out.shape[1:])


def _own(x: torch.Tensor, row: int, start: int) -> torch.Tensor:
    """Row ``row``'s key or value positions ``start:`` as a fresh tensor
    (the request's own forward concatenates a fresh one)."""
    return x[row : row + 1, :, start:].clone(memory_format=torch.contiguous_format)


class RowwiseMode(TorchFunctionMode):
    """Makes a stacked forward compute each row exactly as a forward of that
    row alone would (see the module doc).

    Args:
        keys: for each row of the batch, the key positions its attention
            reads in a full-length layer: its tokens so far, this step's
            included. The cache is left-padded, so an attention call with
            ``N`` key positions gives row i its last ``min(N, keys[i])``
            (fewer than its tokens where a sliding window crops the layer).
            None: attention is not split (for a forward of one unpadded
            row).

    Attributes:
        attention_calls: attention calls split since the mode was created
            (a stacked step that made none did not run through sdpa or a
            split eager attention, so its rows were not kept apart: the
            caller checks).
    """

    def __init__(self, keys: Sequence[int] | None = None):
        super().__init__()
        self.keys = list(keys) if keys is not None else None
        self.attention_calls = 0
        self._suspended = False
        self._outer: list[RowwiseMode | None] = []

    def __enter__(self) -> RowwiseMode:
        self._outer.append(getattr(_active, "mode", None))
        _active.mode = self
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _active.mode = self._outer.pop()
        super().__exit__(*exc)

    def starts(self, n_keys: int) -> list[int]:
        """For an attention call over ``n_keys`` key positions (the cache's
        width plus this step's token), the first position each row reads."""
        assert self.keys is not None
        if n_keys > max(self.keys):
            raise InternalError(f"an attention call has {n_keys} key positions, more than the longest row's {max(self.keys)}: the stacked cache is out of step with its rows")
        return [n_keys - min(n_keys, k) for k in self.keys]

    def splits(self, query: torch.Tensor) -> bool:
        """Whether an attention call with this query is the step's, to be
        split by row (one position per row)."""
        return self.keys is not None and not self._suspended and query.shape[0] == len(self.keys)

    def eager(self, attend: Callable[..., Any], module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, None]:
        """A model's eager attention function ``attend`` once per row, over
        the row's own keys, values and mask columns, with this mode
        suspended (the request's own forward runs it outside any mode).
        Returns the stacked outputs and no weights (rows' widths differ)."""
        self.attention_calls += 1
        rows = len(self.keys)
        outs = []
        self._suspended = True
        try:
            for i, s in enumerate(self.starts(key.shape[-2])):
                m = mask
                if isinstance(mask, torch.Tensor):
                    m = (mask[i : i + 1] if mask.shape[0] == rows else mask)[..., : key.shape[-2]][..., s:]
                out, _ = attend(module, query[i : i + 1].clone(), _own(key, i, s), _own(value, i, s), m, *args, **kwargs)
                outs.append(out)
        finally:
            self._suspended = False
        return torch.cat(outs), None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        # Everything by keyword is not a call transformers' layers make; a
        # suspended mode (an eager row's attention) computes as if absent.
        if not args or self._suspended:
            return func(*args, **kwargs)
        if func is F.linear or (func in _ROW_REDUCTIONS and _reduces_last_dim(args[0], args, kwargs)):
            x = args[0]
            if x.dim() >= 2:
                out = _per_row(func, x, args, kwargs, len(self.keys) if self.keys is not None else None)
                if out is not None:
                    return out
        elif func is F.scaled_dot_product_attention and self.splits(args[0]):
            q, k, v = args[:3]
            self.attention_calls += 1
            # One new token per row: no causal mask within the row (for
            # GQA transformers may fold the heads into the query's
            # sequence dimension; still one position per head), and the
            # row's keys are exactly those its own step attends to (its
            # window's, in a sliding layer), so no mask at all.
            named = {**dict(zip(_SDPA_POSITIONAL, args[3:])), **kwargs}
            kw = {n: a for n, a in named.items() if n not in ("attn_mask", "is_causal")}
            out = [
                F.scaled_dot_product_attention(q[i : i + 1].contiguous(), k[i : i + 1, :, s:].contiguous(), v[i : i + 1, :, s:].contiguous(), attn_mask=None, is_causal=False, **kw)
                for i, s in enumerate(self.starts(k.shape[-2]))
            ]
            return torch.cat(out)
        return func(*args, **kwargs)


def _split_by_row(attend: Callable[..., Any]) -> Callable[..., Any]:
    """A model's eager attention function, split by row inside an active
    RowwiseMode of the calling thread and unchanged everywhere else."""

    def eager_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
        mode = getattr(_active, "mode", None)
        if mode is None or not mode.splits(query):
            return attend(module, query, key, value, attention_mask, *args, **kwargs)
        return mode.eager(attend, module, query, key, value, attention_mask, args, kwargs)

    eager_attention_forward.__wrapped__ = attend  # type: ignore[attr-defined]
    eager_attention_forward._moe_infinity_rowwise = True  # type: ignore[attr-defined]
    return eager_attention_forward


_split_lock = threading.Lock()


def _eager_modules(model: Any) -> list[Any]:
    """The modeling modules of ``model``'s submodules that define the
    module-level ``eager_attention_forward`` their attention calls."""
    mods = {}
    for m in model.modules():
        mod = sys.modules.get(type(m).__module__)
        if mod is not None and callable(getattr(mod, "eager_attention_forward", None)):
            mods[mod.__name__] = mod
    return list(mods.values())


def _split_eager(model: Any) -> None:
    """Wraps the eager attention function of ``model``'s modeling modules
    (once per module, for every thread: the wrapper changes nothing outside
    a RowwiseMode), so that stacked steps split it by row."""
    with _split_lock:
        for mod in _eager_modules(model):
            fn = mod.eager_attention_forward
            if not getattr(fn, "_moe_infinity_rowwise", False):
                mod.eager_attention_forward = _split_by_row(fn)


def _cache_class() -> Any:
    from transformers import DynamicCache

    return DynamicCache


def _layer_types(cfg: Any) -> list[str] | None:
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    types = getattr(text, "layer_types", None)
    if types is None and getattr(text, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * int(getattr(text, "num_hidden_layers", 0) or 0)
    return list(types) if types is not None else None


def stacked_support(model: Any) -> str | None:
    """Why ``model`` cannot be decoded by stacked steps, or None if it can."""
    cfg = model.config
    fwd = inspect.signature(type(model).forward).parameters
    if "logits_to_keep" not in fwd:
        return f"{type(model).__name__}.forward has no logits_to_keep"
    try:
        cache = _cache_class()(config=cfg)
    except Exception as exc:  # noqa: BLE001 — any failure means unsupported
        return f"transformers' DynamicCache cannot be built for it ({exc})"
    layers = list(getattr(cache, "layers", []))
    kinds = {type(layer).__name__ for layer in layers}
    if not layers or not kinds <= {_FULL_LAYER, _SLIDING_LAYER}:
        return f"its cache has {sorted(kinds) or 'no'} layers; stacked steps need plain full-length or sliding-window ones"
    types = _layer_types(cfg)
    chunked = [i for i, layer in enumerate(layers) if type(layer).__name__ == _SLIDING_LAYER and types is not None and i < len(types) and types[i] != "sliding_attention"]
    if chunked:
        # transformers keeps chunked layers in the sliding-window cache
        # class, but a position there attends to its own chunk, not to the
        # last positions: a row's keys are not the last ones of the layer.
        return f"its cache layers {chunked} are {types[chunked[0]]!r}, not sliding windows; stacked steps split attention by sliding window only"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl == "eager":
        if not _eager_modules(model):
            return "its attention is 'eager' but its modeling code has no module-level eager_attention_forward for stacked steps to split by row"
    elif impl != "sdpa":
        return f"its attention is {impl!r}; stacked steps keep requests apart in sdpa or eager attention only (load it with attn_implementation='sdpa' or 'eager')"
    return None


def _set_positions(layer: Any, width: int) -> None:
    """A sliding-window layer counts the batch's full width of positions (its
    tensors keep only the window's), so that transformers places its window
    mask over the same positions as the full-length layers' (get_mask_sizes
    reads this count)."""
    if type(layer).__name__ == _SLIDING_LAYER:
        layer.cumulative_length = width


class StackedBatch:
    """The running batch: one row per request, a shared left-padded cache.

    Args:
        model: the offloaded model.
        exact: split the step's products and attention by row
            (:class:`RowwiseMode`), so each request's tokens are its alone
            tokens. False stacks them plainly (faster on a GPU; the last
            bits, and sometimes tokens, then depend on the batch).
    """

    def __init__(self, model: Any, exact: bool = True):
        self.model = model
        self.exact = exact
        self.device = model.device
        self.lengths: list[int] = []  # tokens in each row's cache
        self.cache: Any = None
        if getattr(model.config, "_attn_implementation", None) == "eager":
            _split_eager(model)

    def __len__(self) -> int:
        return len(self.lengths)

    def _forward(self, cache: Any, **kw: Any) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(use_cache=True, logits_to_keep=1, **kw, **cache_kwargs(self.model, cache))
        return out.logits[:, -1, :].to(dtype=torch.float32)

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[Any, torch.Tensor]:
        """The prompt's own forward, as ``generate`` runs it: returns its
        cache and the last position's logits ([1, vocab], float32)."""
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        cache = _cache_class()(config=self.model.config)
        n = ids.shape[1]
        logits = self._forward(cache, input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(n, device=self.device)[None])
        return cache, logits

    def add(self, cache: Any, length: int) -> None:
        """Appends a prefilled request's cache as the last row. Each layer
        is left-padded to the longest row's positions in it: the batch's
        width in a full-length layer, the longest row's window in a
        sliding one (the request's own cache already keeps only that)."""
        old = self.cache
        width = max([length, *self.lengths])
        new = _cache_class()(config=self.model.config)
        for li, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values
            span = max(k.shape[-2], old.layers[li].keys.shape[-2] if old is not None else 0)
            parts_k, parts_v = [], []
            if old is not None:
                ok, ov = old.layers[li].keys, old.layers[li].values
                grow = span - ok.shape[-2]
                parts_k.append(F.pad(ok, (0, 0, grow, 0)) if grow else ok)
                parts_v.append(F.pad(ov, (0, 0, grow, 0)) if grow else ov)
            grow = span - k.shape[-2]
            parts_k.append(F.pad(k, (0, 0, grow, 0)) if grow else k)
            parts_v.append(F.pad(v, (0, 0, grow, 0)) if grow else v)
            new.update(torch.cat(parts_k), torch.cat(parts_v), li)
            _set_positions(new.layers[li], width)
        self.cache = new
        self.lengths.append(length)

    def remove(self, rows: Sequence[int]) -> None:
        """Drops rows (finished requests) and the padding no row needs any
        more."""
        drop = set(rows)
        keep = [i for i in range(len(self.lengths)) if i not in drop]
        self.lengths = [self.lengths[i] for i in keep]
        if not keep:
            self.cache = None
            return
        width = max(self.lengths)
        new = _cache_class()(config=self.model.config)
        index = torch.tensor(keep, device=self.device)
        for li, layer in enumerate(self.cache.layers):
            k, v = layer.keys, layer.values
            # A full-length layer keeps the longest row's positions; a
            # sliding one keeps the window's, or fewer if every row left
            # is shorter.
            cut = k.shape[-2] - min(k.shape[-2], width)
            new.update(k.index_select(0, index.to(k.device))[:, :, cut:], v.index_select(0, index.to(v.device))[:, :, cut:], li)
            _set_positions(new.layers[li], width)
        self.cache = new

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """One decode step: row i's next input token is ``tokens[i]``.
        Returns the rows' logits ([rows, vocab], float32)."""
        if len(tokens) != len(self.lengths):
            raise AssertionError(f"{len(tokens)} tokens for {len(self.lengths)} rows")
        width = max(self.lengths)
        starts = [width - n for n in self.lengths]
        rows = len(tokens)
        mask = torch.ones(rows, width + 1, dtype=torch.long, device=self.device)
        for i, s in enumerate(starts):
            mask[i, :s] = 0
        kw = {
            "input_ids": torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None],
            "attention_mask": mask,
            "position_ids": torch.tensor(self.lengths, dtype=torch.long, device=self.device)[:, None],
            "cache_position": torch.tensor([width], dtype=torch.long, device=self.device),
        }
        if self.exact and (rows > 1 or starts[0] > 0):  # one unpadded row is a forward of that request alone
            mode = RowwiseMode([n + 1 for n in self.lengths])
            with mode:
                logits = self._forward(self.cache, **kw)
            if mode.attention_calls == 0 and self.model.config.num_hidden_layers:
                raise RuntimeError("a stacked step made no sdpa or eager attention call, so its rows were not kept apart; serve this model with batching='threads'")
        else:
            logits = self._forward(self.cache, **kw)
        self.lengths = [n + 1 for n in self.lengths]
        return logits
