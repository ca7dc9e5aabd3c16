"""The decode benchmark's random-weight model as a llama.cpp GGUF file (Q8_0),
so that llama.cpp runs the same shape and the same weights as
``benchmarks/decode.py``.

    python benchmarks/peers/write_gguf.py --preset tiny --device cpu --out build/peers/tiny.gguf
    python benchmarks/peers/write_gguf.py --preset qwen3-30b-a3b --out build/peers/qwen3-30b-a3b-q8_0.gguf
    python benchmarks/peers/write_gguf.py --preset tiny --device cpu --out t.gguf --safetensors build/peers/tiny-bf16

The weights come from moe_infinity.bench.build(preset, dense_device): the same
experts on every device (they are filled from a seeded host pool), and the
same dense weights as decode.py when --device is the one decode.py runs on
(the dense weights are drawn from a generator on that device: a CPU build and
a CUDA build differ there).

Layout, as llama.cpp's converter (convert_hf_to_gguf.py) writes it:
qwen3_moe -> arch "qwen3moe", mixtral -> arch "llama" (q_proj/k_proj rows
permuted for llama.cpp's non-NeoX RoPE, as the converter does); fused expert
tensors [E, 2I, H] split into ffn_gate_exps / ffn_up_exps [E, I, H] and
ffn_down_exps [E, H, I] (GGML ne reversed); norms and the router
(ffn_gate_inp) F32, everything else Q8_0 (type 7, MOSTLY_Q8_0).

Tokenizer: the model has none, and llama.cpp needs one. This writes a
synthetic SentencePiece-style ("llama") vocabulary of the preset's vocab_size:
<unk>, <s>, </s>, then byte tokens <0x00>.. as far as they fit (so "\\n"
resolves), then filler pieces. llama-bench feeds random token ids, so the
vocabulary only has to load; text through llama-completion is meaningless.

Known difference: llama.cpp's qwen3moe graph always renormalises the top-k
routing weights (norm_topk_prob=True, as the released model), while the
preset's transformers config leaves norm_topk_prob at its default (False).
It changes the mixing weights of the chosen experts, not which experts run or
how many bytes move.

Quantization: Q8_0 blocks of 32 (an fp16 scale max|x|/127, then 32 int8
round-half-away-from-zero(x/scale)), computed with torch (on the GPU when
there is one) in the same float32 operations as gguf.quants.Q8_0; each
tensor's first blocks are checked byte for byte against gguf.quants, and
--quantizer gguf uses gguf.quants for everything (slow: numpy, one core).

Streaming: the header and every tensor's info are written first, then the
tensors one at a time (quantizing the next while the previous is written), so
memory beyond what build() holds is about two quantized tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

try:
    import moe_infinity.bench  # noqa: F401
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import gguf  # noqa: E402  (PyPI's gguf; run_peers.sh installs the carried wheel)
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import MODEL_TENSOR as T  # noqa: E402

from moe_infinity.bench import PRESETS, build  # noqa: E402

#: transformers model_type -> (llama.cpp architecture, gguf MODEL_ARCH).
ARCHES = {"qwen3_moe": ("qwen3moe", gguf.MODEL_ARCH.QWEN3MOE), "mixtral": ("llama", gguf.MODEL_ARCH.LLAMA)}

BLOCK = 32  # Q8_0 values per block
BLOCK_BYTES = 34  # fp16 scale + 32 int8


def q8_0(x: torch.Tensor, device: torch.device, chunk: int = 1 << 26) -> np.ndarray:
    """x (any float dtype, last dim a multiple of 32) as Q8_0 bytes, shape
    x.shape[:-1] + (x.shape[-1] // 32 * 34,), uint8: the same float32
    operations as gguf.quants.Q8_0.quantize_blocks (itself bit-exact with
    ggml's reference quantize_row_q8_0), run with torch on device in chunks
    of `chunk` values."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"Q8_0 needs the last dimension to be a multiple of {BLOCK}, got shape {tuple(x.shape)}")
    flat = x.reshape(-1, BLOCK)
    out = torch.empty((flat.shape[0], BLOCK_BYTES), dtype=torch.uint8)
    rows = max(1, chunk // BLOCK)
    for i in range(0, flat.shape[0], rows):
        b = flat[i : i + rows].to(device=device, dtype=torch.float32, non_blocking=True)
        d = b.abs().amax(dim=1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        v = b * inv
        a = v.abs()
        fl = torch.floor(a)
        q = torch.sign(v) * (fl + torch.floor(2 * (a - fl)))  # gguf.quants.np_roundf
        blk = torch.cat([d.to(torch.float16).view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
        out[i : i + rows].copy_(blk)
    return out.numpy().reshape(*x.shape[:-1], x.shape[-1] // BLOCK * BLOCK_BYTES)


def q8_0_reference(x: torch.Tensor) -> np.ndarray:
    """gguf.quants' Q8_0 of x (numpy, one core)."""
    return gguf.quants.quantize(x.to(torch.float32).cpu().numpy(), QT.Q8_0)


def spot_check(x: torch.Tensor, got: np.ndarray, n_blocks: int = 4096) -> None:
    """The first n_blocks blocks of got equal gguf.quants' Q8_0 of the same values."""
    flat = x.reshape(-1)[: n_blocks * BLOCK].reshape(-1, BLOCK)
    want = q8_0_reference(flat).reshape(-1)
    have = got.reshape(-1)[: want.size]
    if not np.array_equal(have, want):
        bad = int(np.flatnonzero(have != want)[0])
        raise AssertionError(f"Q8_0 differs from gguf.quants at byte {bad} (block {bad // BLOCK_BYTES})")


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q_proj/k_proj rows reordered from HF's rotate-half RoPE to llama.cpp's
    interleaved one (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Entry = tuple[str, tuple[int, ...], QT, Callable[[], torch.Tensor]]


def tensor_plan(model, cfg, outtype: QT = QT.Q8_0) -> list[Entry]:
    """(GGUF name, numpy-order shape, type, getter) for every tensor, named
    as gguf's TENSOR_NAMES spell them; every model parameter is used exactly
    once (a RuntimeError names any left over). Matrices get outtype (Q8_0,
    or F32 for parity checks), norms and the router F32."""
    params = dict(model.named_parameters())
    used: set[str] = set()
    arch = cfg.model_type
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads

    def p(name: str) -> torch.Tensor:
        used.add(name)
        return params[name]

    def name(t: T, bid: int | None = None) -> str:
        return gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight"

    plan: list[Entry] = []

    def add(t: T, bid: int | None, get: Callable[[], torch.Tensor], shape: tuple[int, ...], qtype: QT) -> None:
        plan.append((name(t, bid), shape, qtype, get))

    def dense(t: T, bid: int | None, hf: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        w = p(hf)
        qtype = QT.F32 if w.dim() == 1 or t == T.FFN_GATE_INP else outtype
        get = (lambda w=w: transform(w)) if transform else (lambda w=w: w)
        add(t, bid, get, tuple(w.shape), qtype)

    dense(T.TOKEN_EMBD, None, "model.embed_tokens.weight")
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        dense(T.ATTN_NORM, i, pre + "input_layernorm.weight")
        if arch == "mixtral":
            dense(T.ATTN_Q, i, pre + "self_attn.q_proj.weight", lambda w: permute_rope(w, n_head))
            dense(T.ATTN_K, i, pre + "self_attn.k_proj.weight", lambda w: permute_rope(w, n_kv))
        else:
            dense(T.ATTN_Q, i, pre + "self_attn.q_proj.weight")
            dense(T.ATTN_K, i, pre + "self_attn.k_proj.weight")
            dense(T.ATTN_Q_NORM, i, pre + "self_attn.q_norm.weight")
            dense(T.ATTN_K_NORM, i, pre + "self_attn.k_norm.weight")
        dense(T.ATTN_V, i, pre + "self_attn.v_proj.weight")
        dense(T.ATTN_OUT, i, pre + "self_attn.o_proj.weight")
        dense(T.FFN_NORM, i, pre + "post_attention_layernorm.weight")
        dense(T.FFN_GATE_INP, i, pre + "mlp.gate.weight")
        gu, down = p(pre + "mlp.experts.gate_up_proj"), p(pre + "mlp.experts.down_proj")
        E, two_i, H = gu.shape
        inter = two_i // 2
        # transformers: gate, up = linear(x, gate_up_proj[e]).chunk(2) -> rows [:I] gate, [I:] up
        add(T.FFN_GATE_EXP, i, lambda gu=gu, inter=inter: gu[:, :inter], (E, inter, H), outtype)
        add(T.FFN_UP_EXP, i, lambda gu=gu, inter=inter: gu[:, inter:], (E, inter, H), outtype)
        add(T.FFN_DOWN_EXP, i, lambda down=down: down, tuple(down.shape), outtype)
    dense(T.OUTPUT_NORM, None, "model.norm.weight")
    dense(T.OUTPUT, None, "lm_head.weight")
    left = sorted(set(params) - used)
    if left:
        raise RuntimeError(f"parameters with no GGUF tensor: {left[:8]}")
    return plan


def nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    n = int(np.prod(shape))
    return n * 4 if qtype == QT.F32 else n // BLOCK * BLOCK_BYTES


def synthetic_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of n tokens: <unk> <s> </s>, byte
    tokens <0x00>.. while they fit, then filler pieces."""
    if n < 3:
        raise ValueError(f"vocab_size {n} is too small for <unk>, <s>, </s>")
    toks = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    for b in range(min(256, n - 3)):
        toks.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
    for i in range(n - len(toks)):
        toks.append(f"\u2581t{i}")
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 3 + [-float(i) for i in range(n - 3)]
    return toks, scores, [int(t) for t in types]


def write_metadata(w: gguf.GGUFWriter, cfg, preset: str, outtype: QT = QT.Q8_0) -> None:
    w.add_name(f"moe_infinity bench {preset} (random weights)")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if outtype == QT.Q8_0 else gguf.LlamaFileType.ALL_F32)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    n_exp = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    w.add_expert_count(n_exp)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.model_type == "qwen3_moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_vocab_size(cfg.vocab_size)
    toks, scores, types = synthetic_vocab(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def write_gguf(model, cfg, preset: str, out: Path, device: torch.device, quantizer: str, outtype: QT = QT.Q8_0) -> dict:
    arch_name, arch = ARCHES[cfg.model_type]
    plan = tensor_plan(model, cfg, outtype)
    known = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[arch] for i in range(cfg.num_hidden_layers)}
    unknown = [n for n, *_ in plan if n not in known]
    if unknown:  # gguf's constants list the tensors each architecture has
        raise RuntimeError(f"not {arch_name} tensors in gguf's MODEL_TENSORS: {unknown[:8]}")
    total = sum(nbytes(s, q) for _, s, q, _ in plan)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free + (out.stat().st_size if out.exists() else 0)
    if total + (64 << 20) > free:
        raise SystemExit(f"write_gguf: {out} needs {total / 1e9:.1f} GB, {out.parent} has {free / 1e9:.1f} GB free")
    w = gguf.GGUFWriter(out, arch_name)
    write_metadata(w, cfg, preset, outtype)
    for n, shape, qtype, _ in plan:
        w.add_tensor_info(n, shape, np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    quant_s = 0.0
    with ThreadPoolExecutor(1) as pool:  # writes in order while the next tensor is quantized
        pending = None
        for k, (n, shape, qtype, get) in enumerate(plan):
            tq = time.perf_counter()
            x = get()
            with torch.no_grad():
                if qtype == QT.F32:
                    data = x.to(torch.float32).cpu().numpy().copy()
                elif quantizer == "gguf":
                    data = q8_0_reference(x)
                else:
                    data = q8_0(x, device)
                    spot_check(x, data)
            if tuple(data.shape[:-1]) != shape[:-1]:
                raise AssertionError(f"{n}: data shape {data.shape} against {shape}")
            quant_s += time.perf_counter() - tq
            if pending is not None:
                pending.result()
            pending = pool.submit(w.write_tensor_data, data)
            if k % 50 == 0 or k == len(plan) - 1:
                print(f"write_gguf: {k + 1}/{len(plan)} tensors, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if pending is not None:
            pending.result()
    w.close()
    return {
        "gguf": str(out),
        "gguf_bytes": out.stat().st_size,
        "tensors": len(plan),
        "arch": arch_name,
        "quantizer": quantizer,
        "write_s": time.perf_counter() - t0,
        "quantize_s": quant_s,
    }


def write_safetensors(model, cfg, out_dir: Path, shard_bytes: int = 4 << 30) -> dict:
    """The model as a Hugging Face bf16 checkpoint (config.json, shards of at
    most shard_bytes, model.safetensors.index.json), shard by shard so that
    only one shard's copy is in memory.

    The FP8 side of the comparison with Q8_0 needs no checkpoint: decode.py
    --expert-dtype fp8 builds these same seeded weights and compresses the
    experts to block FP8 in memory (offload(expert_dtype="fp8")); loading
    this bf16 checkpoint with from_pretrained(expert_dtype="fp8") compresses
    it to the same bytes."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out_dir)
    items = [(n, t) for n, t in model.state_dict().items() if not n.endswith("inv_freq")]
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for n, t in items:
        b = t.numel() * t.element_size()
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((n, t))
        size += b
    index: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: t.detach().to("cpu").contiguous() for n, t in shard}, str(out_dir / fname), metadata={"format": "pt"})
        for n, t in shard:
            index[n] = fname
            total += t.numel() * t.element_size()
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    return {"safetensors": str(out_dir), "safetensors_bytes": total, "safetensors_dtype": "bfloat16", "shards": len(shards)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, help="the GGUF file to write")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where build() puts the dense weights (match decode.py's --device for the same weights) and where Q8_0 is computed")
    ap.add_argument("--seed", type=int, default=0, help="build()'s seed (decode.py uses 0)")
    ap.add_argument("--quantizer", choices=["torch", "gguf"], default="torch",
                    help="torch: fast, spot-checked against gguf.quants; gguf: gguf.quants for every tensor (numpy, slow)")
    ap.add_argument("--outtype", choices=["q8_0", "f32"], default="q8_0",
                    help="the matrices' type: q8_0 (the benchmark), or f32 (to check llama.cpp's output against transformers')")
    ap.add_argument("--safetensors", help="also write the weights as a bf16 Hugging Face checkpoint in this folder")
    ap.add_argument("--info", help="write a JSON summary here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}, but torch sees no usable GPU (use --device cpu)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    model, cfg = build(args.preset, args.device, seed=args.seed)
    info = {"preset": args.preset, "device": args.device, "seed": args.seed, "build_s": time.perf_counter() - t0,
            "gguf_package": getattr(gguf, "__version__", None) or _dist_version("gguf")}
    info.update(write_gguf(model, cfg, args.preset, Path(args.out), torch.device(args.device), args.quantizer,
                               QT.Q8_0 if args.outtype == "q8_0" else QT.F32))
    if args.safetensors:
        info.update(write_safetensors(model, cfg, Path(args.safetensors)))
    print(json.dumps(info), flush=True)
    if args.info:
        Path(args.info).parent.mkdir(parents=True, exist_ok=True)
        Path(args.info).write_text(json.dumps(info, indent=1))
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
