"""Tiny random MoE models of every supported family, built from configs and
saved with ``save_pretrained`` (no download). Shared by the test suites."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

VOCAB = 96

CONFIGS: dict[str, dict] = {
    "mixtral": dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    ),
    "qwen2_moe": dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256,
    ),
    "qwen3_moe": dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, head_dim=8, max_position_embeddings=256,
    ),
    "olmoe": dict(
        hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        num_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    ),
    "deepseek_v3": dict(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, max_position_embeddings=256, rope_scaling=None,
    ),
    "gpt_oss": dict(
        hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"], sliding_window=16,
    ),
    "switch_transformers": dict(
        d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4,
        encoder_sparse_step=2, decoder_sparse_step=2, decoder_start_token_id=0,
    ),
    "nllb-moe": dict(
        d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4, encoder_sparse_step=2,
        decoder_sparse_step=2, max_position_embeddings=256, decoder_start_token_id=2,
    ),
}

SEQ2SEQ = {"switch_transformers", "nllb-moe"}
#: Families whose experts transformers keeps fused in memory, so a fused
#: on-disk copy can be written from the state dict.
FUSED_IN_MEMORY = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"}


def auto_class(model_type: str):
    return AutoModelForSeq2SeqLM if model_type in SEQ2SEQ else AutoModelForCausalLM


def make_config(model_type: str, **overrides):
    kw = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(CONFIGS[model_type])
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def build(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised model (scaled so that routing is not uniform)."""
    torch.manual_seed(seed)
    cfg = make_config(model_type, **overrides)
    model = auto_class(model_type).from_config(cfg, dtype=dtype)
    # Larger router weights make routing decisive, so greedy decoding is not
    # decided by near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate.weight" in name or "router" in name:
                p.mul_(8)
    return model.eval()


def save(model, directory: Path, fused: bool = False) -> Path:
    """Writes ``model`` with save_pretrained (Hub layout: one tensor per
    expert), or, with ``fused=True``, writes transformers' in-memory fused
    tensors directly (the fused on-disk layout)."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    model.save_pretrained(directory)
    if fused:
        for f in directory.glob("*.safetensors"):
            f.unlink()
        idx = directory / "model.safetensors.index.json"
        if idx.exists():
            idx.unlink()
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        # Tied weights appear twice in the state dict; keep the first.
        seen, out = set(), {}
        for k, v in sd.items():
            key = (v.data_ptr(), v.shape)
            if key in seen:
                continue
            seen.add(key)
            out[k] = v
        save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def expert_names(directory: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            names += [k for k in fh.keys() if ".experts." in k]
    return names


def write_tokenizer(directory: Path) -> None:
    """A tiny character-level tokenizer saved next to the model, so that
    pipelines and streamers work offline."""
    from moe_infinity.builtin import char_tokenizer

    char_tokenizer([chr(c) for c in range(32, 32 + VOCAB - 3)]).save_pretrained(directory)


def num_experts(model_type: str) -> int:
    c = CONFIGS[model_type]
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if key in c:
            return c[key]
    raise KeyError(model_type)


def moe_layers(model_type: str) -> int:
    c = CONFIGS[model_type]
    if model_type in SEQ2SEQ:
        return 2  # one sparse layer in the encoder, one in the decoder
    return c["num_hidden_layers"] - c.get("first_k_dense_replace", 0)


def dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


#: Device the parity suites run on: "cpu" (default) or "cuda" (set
#: MOE_INFINITY_TEST_DEVICE=cuda on a GPU machine; scripts/gpu_check.sh does).
DEVICE = __import__("os").environ.get("MOE_INFINITY_TEST_DEVICE", "cpu")


def plain(path, **kw):
    """The checkpoint loaded with plain transformers on DEVICE."""
    if DEVICE == "cuda":
        kw["device_map"] = "cuda"
    cfg = AutoConfig.from_pretrained(path)
    return auto_class(cfg.model_type).from_pretrained(path, **kw).eval()


def load(path, slots: int | None = None, slot_bytes: int | None = None, **kw):
    """The checkpoint loaded with moe_infinity on DEVICE with a cache of
    `slots` experts (on the CPU through device_memory = slots × slot size;
    on the GPU, where device_memory also covers the dense weights, through
    max_slots)."""
    import moe_infinity as mi

    if DEVICE == "cuda":
        kw.setdefault("device_memory", "4GiB")
        kw.setdefault("kernels", False)
        if slots is not None:
            kw["engine_options"] = dict(kw.get("engine_options") or {}, max_slots=slots)
        return mi.from_pretrained(path, device="cuda", **kw)
    if slots is not None:
        kw["device_memory"] = slots * slot_bytes
    kw.setdefault("device_memory", 1 << 30)
    return mi.from_pretrained(path, device="cpu", **kw)


def to_device(t):
    return t.to(DEVICE)


def train_briefly(model, steps: int = 150, device: str = "cuda", seq_len: int = 48, batch: int = 16, seed: int = 0):
    """Trains a tiny model for a few steps on a deterministic sequence rule
    (next token = (5·token + 3) mod (V−3) + 3), in float32, so that it
    predicts confidently, as trained models do. Random models' top-1 logits
    are near ties, so tests of agreement between numerically different
    implementations would measure ties rather than the implementations."""
    dtype = next(model.parameters()).dtype
    model = model.float().to(device).train()
    g = torch.Generator().manual_seed(seed)
    span = VOCAB - 3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        start = torch.randint(0, span, (batch, 1), generator=g)
        seq = [start]
        for _ in range(seq_len - 1):
            seq.append((5 * seq[-1] + 3) % span)
        ids = (torch.cat(seq, dim=1) + 3).to(device)
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval().to("cpu", dtype=dtype)
