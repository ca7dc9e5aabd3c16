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

:class:`RowwiseMode` removes both inside the step: it splits every
``torch.nn.functional.linear`` into one product per row (each the M = 1
product ``generate`` computes for that request alone), does the same for
reductions over the last dimension (mean, sum, var, softmax), and computes
``scaled_dot_product_attention`` row by row over the row's own cache
positions only. Everything else in a decoder layer (elementwise work,
rotary embeddings, top-k, the experts' gather and sums) is already row-wise. The
rest of the forward (embedding, mask building, the layers' Python) runs once.

Each request is prefilled alone (its prompt's own forward), then joins the
running batch's cache as a new row, left-padded to the batch's length; rows
leave when their request finishes. Supported where attention is
``sdpa`` and every layer keeps a plain full-length cache (checked by
:func:`stacked_support`); other models are decoded by the lockstep threads.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .._compat import cache_kwargs

__all__ = ["RowwiseMode", "StackedBatch", "stacked_support"]


# Reductions over the last dimension (norms, the router's softmax and
# renormalization) that a GPU library may split differently across threads
# for 1 row and for 16 (split reductions keep an SM busy when rows are
# few), and so round differently: computed row by row too. Their second
# positional argument is the dimension.
_ROW_REDUCTIONS = frozenset(
    {torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum, torch.var, torch.Tensor.var, F.softmax, torch.softmax, torch.Tensor.softmax}
)


# scaled_dot_product_attention's parameters after query, key and value.
_SDPA_POSITIONAL = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _reduces_last_dim(x: Any, args: tuple, kwargs: dict) -> bool:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return False
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    return isinstance(dim, int) and not isinstance(dim, bool) and dim % x.dim() == x.dim() - 1


def _per_row(func: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """func over each row of x (all dimensions but the last flattened) on
    its own, stacked back; None for a single row."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 1
    if rows <= 1:
        return None
    flat = x.reshape(rows, x.shape[-1])
    # A fresh tensor per row: a view into the stack would differ from the
    # request's own input in alignment, which some kernels round by.
    out = [func(flat[i : i + 1].clone(), *args[1:], **kwargs) for i in range(rows)]
    return torch.cat(out).reshape(*x.shape[:-1], *out[0].shape[1:])


class RowwiseMode(TorchFunctionMode):
    """Makes a stacked forward compute each row exactly as a forward of that
    row alone would (see the module doc).

    Args:
        starts: for each row of the batch, the first of its cache positions
            (the cache is left-padded): attention for row i reads key and
            value positions ``starts[i]:``. None: attention is not split
            (for a forward of one unpadded row).

    Attributes:
        attention_calls: attention calls split since the mode was created
            (a stacked step that made none did not run through sdpa, so its
            rows were not kept apart: the caller checks).
    """

    def __init__(self, starts: Sequence[int] | None = None):
        super().__init__()
        self.starts = list(starts) if starts is not None else None
        self.attention_calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not args:  # everything by keyword: not a call transformers' layers make
            return func(*args, **kwargs)
        if func is F.linear or (func in _ROW_REDUCTIONS and _reduces_last_dim(args[0], args, kwargs)):
            x = args[0]
            if x.dim() >= 2:
                out = _per_row(func, x, args, kwargs)
                if out is not None:
                    return out
        elif func is F.scaled_dot_product_attention and self.starts is not None:
            q, k, v = args[:3]
            if q.shape[0] == len(self.starts):
                self.attention_calls += 1
                # One new token per row: no causal mask within the row (for
                # GQA transformers may fold the heads into the query's
                # sequence dimension; still one position per head).
                named = {**dict(zip(_SDPA_POSITIONAL, args[3:])), **kwargs}
                kw = {n: a for n, a in named.items() if n not in ("attn_mask", "is_causal")}
                out = [
                    F.scaled_dot_product_attention(
                        q[i : i + 1].contiguous(), k[i : i + 1, :, s:].contiguous(), v[i : i + 1, :, s:].contiguous(), attn_mask=None, is_causal=False, **kw
                    )
                    for i, s in enumerate(self.starts)
                ]
                return torch.cat(out)
        return func(*args, **kwargs)


def _cache_class() -> Any:
    from transformers import DynamicCache

    return DynamicCache


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
    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
    if kinds != {"DynamicLayer"}:
        return f"its cache has {sorted(kinds) or 'no'} layers (sliding windows); stacked steps need plain full-length ones"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl != "sdpa":
        return f"its attention is {impl!r}; stacked steps keep requests apart in sdpa attention only (load it with attn_implementation='sdpa' if the model supports it)"
    return None


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
        """Appends a prefilled request's cache as the last row."""
        old = self.cache
        width = max([length, *self.lengths]) if self.lengths else length
        new = _cache_class()(config=self.model.config)
        for li, layer in enumerate(cache.layers):
            k, v = layer.keys, layer.values
            parts_k, parts_v = [], []
            if old is not None:
                ok, ov = old.layers[li].keys, old.layers[li].values
                grow = width - ok.shape[-2]
                parts_k.append(F.pad(ok, (0, 0, grow, 0)) if grow else ok)
                parts_v.append(F.pad(ov, (0, 0, grow, 0)) if grow else ov)
            grow = width - k.shape[-2]
            parts_k.append(F.pad(k, (0, 0, grow, 0)) if grow else k)
            parts_v.append(F.pad(v, (0, 0, grow, 0)) if grow else v)
            new.update(torch.cat(parts_k), torch.cat(parts_v), li)
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
            cut = k.shape[-2] - width
            new.update(k.index_select(0, index.to(k.device))[:, :, cut:], v.index_select(0, index.to(v.device))[:, :, cut:], li)
        self.cache = new

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """One decode step: row i's next input token is ``tokens[i]``.
        Returns the rows' logits ([rows, vocab], float32)."""
        if len(tokens) != len(self.lengths):
            raise AssertionError(f"{len(tokens)} tokens for {len(self.lengths)} rows")
        width = self.cache.get_seq_length()
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
            mode = RowwiseMode(starts)
            with mode:
                logits = self._forward(self.cache, **kw)
            if mode.attention_calls == 0 and self.model.config.num_hidden_layers:
                raise RuntimeError("a stacked step made no sdpa attention call, so its rows were not kept apart; serve this model with batching='threads'")
        else:
            logits = self._forward(self.cache, **kw)
        self.lengths = [n + 1 for n in self.lengths]
        return logits
