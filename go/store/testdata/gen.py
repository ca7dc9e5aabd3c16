#!/usr/bin/env python3
"""Generate tiny safetensors checkpoints for the go/store tests.

Run from anywhere:  python3 go/store/testdata/gen.py
Needs torch and safetensors. Writes, next to this script:

  mixtral/model.safetensors          single file, per-expert (Mixtral names),
                                     2 layers x 4 experts, w1/w2/w3, bf16, plus
                                     embeddings, an int64 buffer, a bool mask and
                                     shared_expert(s) tensors that must not match
  qwen/model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
                                     sharded, Qwen-MoE names (gate/up/down_proj),
                                     f32; layer 1's experts straddle both shards
  fused/model.safetensors            fused layout: gpt-oss style gate_up_proj
                                     [E,2I,H], down_proj [E,H,I], *_bias [E,...];
                                     layer 1 uses U8 MXFP4-style blocks/scales
  switch/switch.safetensors          Switch-Transformers names (expert_<e>), f16
  switch/nllb.safetensors            NLLB-MoE names (ffn.experts.expert_<e>.fc1.bias)
  manifest.json                      expected tensors and expert parts (sha256
                                     of the exact bytes), built independently of
                                     any parsing, for the Go tests

Values are deterministic (seeded), so re-running reproduces the same files.
"""
import hashlib
import json
import os

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
H, I, E = 8, 4, 4  # hidden size, expert intermediate size, experts per layer

gen = torch.Generator().manual_seed(1234)


def rand(shape, dtype):
    if dtype in (torch.uint8, torch.int64, torch.int32):
        return torch.randint(0, 250, shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randn(shape, generator=gen).to(dtype)


def raw(t):
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def sha(t):
    return hashlib.sha256(raw(t)).hexdigest()


ST_NAME = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL",
}


class Ckpt:
    """Collects the tensors of one checkpoint and the expected expert index."""

    def __init__(self, name):
        self.name = name
        self.files = {}  # file name -> {tensor name: tensor}
        self.modules = []

    def add(self, file, name, t):
        self.files.setdefault(file, {})[name] = t
        return t

    def per_expert(self, file_of, prefix, roles, dtype, n=E, id_fmt="{e}"):
        """roles: {role: shape}. file_of(e) -> file name."""
        parts = []
        for e in range(n):
            for role, shape in roles.items():
                name = f"{prefix}.experts.{id_fmt.format(e=e)}.{role}"
                t = self.add(file_of(e), name, rand(shape, dtype))
                parts.append(part(e, role, t, name))
        self.modules.append(dict(prefix=prefix, num_experts=n, roles=sorted(roles),
                                 fused=False, parts=parts))

    def fused(self, file, prefix, roles, n=E):
        """roles: {role: (shape_without_E, dtype)}."""
        parts = []
        for role, (shape, dtype) in roles.items():
            name = f"{prefix}.experts.{role}"
            t = self.add(file, name, rand((n, *shape), dtype))
            for e in range(n):
                parts.append(part(e, role, t[e], name))
        self.modules.append(dict(prefix=prefix, num_experts=n, roles=sorted(roles),
                                 fused=True, parts=parts))

    def save(self, metadata):
        d = os.path.join(HERE, self.name)
        os.makedirs(d, exist_ok=True)
        for f, tensors in self.files.items():
            save_file(tensors, os.path.join(d, f), metadata=metadata)

    def manifest(self):
        tensors = {}
        for f, ts in self.files.items():
            for n, t in ts.items():
                tensors[n] = dict(file=f, dtype=ST_NAME[t.dtype], shape=list(t.shape),
                                  nbytes=len(raw(t)), sha256=sha(t))
        modules = sorted(self.modules, key=lambda m: natural_key(m["prefix"]))
        return dict(files=sorted(self.files), tensors=tensors, modules=modules)


def natural_key(prefix):
    """Natural order of dot-separated names: numeric segments compare as numbers."""
    return [(0, int(seg), seg) if seg.isdigit() else (1, 0, seg) for seg in prefix.split(".")]


def part(e, role, t, name):
    return dict(expert=e, role=role, tensor=name, dtype=ST_NAME[t.dtype],
                shape=list(t.shape), nbytes=len(raw(t)), sha256=sha(t))


def mixtral():
    c = Ckpt("mixtral")
    f = "model.safetensors"
    c.add(f, "model.embed_tokens.weight", rand((16, H), torch.bfloat16))
    c.add(f, "lm_head.weight", rand((16, H), torch.bfloat16))
    c.add(f, "model.norm.weight", rand((H,), torch.bfloat16))
    c.add(f, "model.rotary_emb.position_ids", torch.arange(16, dtype=torch.int64))
    c.add(f, "model.causal_mask", rand((4, 4), torch.bool))
    for layer in range(2):
        p = f"model.layers.{layer}"
        c.add(f, f"{p}.self_attn.q_proj.weight", rand((H, H), torch.bfloat16))
        c.add(f, f"{p}.block_sparse_moe.gate.weight", rand((E, H), torch.bfloat16))
        c.per_expert(lambda e: f, f"{p}.block_sparse_moe",
                     {"w1.weight": (I, H), "w2.weight": (H, I), "w3.weight": (I, H)}, torch.bfloat16)
    # Must not be mistaken for routed experts.
    c.add(f, "model.layers.1.mlp.shared_experts.gate_proj.weight", rand((I, H), torch.bfloat16))
    c.add(f, "model.layers.1.mlp.shared_expert.up_proj.weight", rand((I, H), torch.bfloat16))
    c.add(f, "model.layers.1.mlp.shared_experts.0.down_proj.weight", rand((H, I), torch.bfloat16))
    c.save({"format": "pt", "model": "tiny-mixtral"})
    return c


def qwen():
    c = Ckpt("qwen")
    s1, s2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    roles = {"gate_proj.weight": (I, H), "up_proj.weight": (I, H), "down_proj.weight": (H, I)}
    c.add(s1, "model.embed_tokens.weight", rand((16, H), torch.float32))
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        home = s1 if layer == 0 else s2
        c.add(home, f"{p}.gate.weight", rand((E, H), torch.float32))
        c.add(home, f"{p}.shared_expert.gate_proj.weight", rand((I, H), torch.float32))
        c.add(home, f"{p}.shared_expert.up_proj.weight", rand((I, H), torch.float32))
        c.add(home, f"{p}.shared_expert.down_proj.weight", rand((H, I), torch.float32))
        c.add(home, f"{p}.shared_expert_gate.weight", rand((1, H), torch.float32))
        # layer 0 in shard 1; layer 1's experts 0,1 in shard 1 and 2,3 in shard 2
        c.per_expert((lambda e: s1) if layer == 0 else (lambda e: s1 if e < 2 else s2),
                     p, roles, torch.float32)
    c.add(s2, "model.norm.weight", rand((H,), torch.float32))
    c.save({"format": "pt"})
    weight_map = {n: f for f, ts in c.files.items() for n in ts}
    total = sum(len(raw(t)) for ts in c.files.values() for t in ts.values())
    with open(os.path.join(HERE, "qwen", "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                  fh, indent=2)
        fh.write("\n")
    return c


def fused():
    c = Ckpt("fused")
    f = "model.safetensors"
    c.add(f, "model.embed_tokens.weight", rand((16, H), torch.bfloat16))
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        c.add(f, f"{p}.router.weight", rand((E, H), torch.bfloat16))
        c.add(f, f"{p}.router.bias", rand((E,), torch.bfloat16))
    c.fused(f, "model.layers.0.mlp", {
        "gate_up_proj": ((2 * I, H), torch.bfloat16),
        "gate_up_proj_bias": ((2 * I,), torch.bfloat16),
        "down_proj": ((H, I), torch.bfloat16),
        "down_proj_bias": ((H,), torch.bfloat16),
    })
    c.fused(f, "model.layers.1.mlp", {  # MXFP4-style: U8 blocks and scales
        "gate_up_proj_blocks": ((2 * I, 1, 4), torch.uint8),
        "gate_up_proj_scales": ((2 * I, 1), torch.uint8),
        "gate_up_proj_bias": ((2 * I,), torch.bfloat16),
        "down_proj_blocks": ((H, 1, 2), torch.uint8),
        "down_proj_scales": ((H, 1), torch.uint8),
        "down_proj_bias": ((H,), torch.bfloat16),
    })
    c.save({"format": "pt"})
    return c


def switch():
    c = Ckpt("switch")
    sw, nl = "switch.safetensors", "nllb.safetensors"
    c.add(sw, "shared.weight", rand((16, H), torch.float16))
    c.add(sw, "encoder.block.1.layer.1.mlp.router.classifier.weight", rand((E, H), torch.float16))
    c.per_expert(lambda e: sw, "encoder.block.1.layer.1.mlp",
                 {"wi.weight": (I, H), "wo.weight": (H, I)}, torch.float16, id_fmt="expert_{e}")
    c.add(sw, "decoder.block.1.layer.2.mlp.router.classifier.weight", rand((E, H), torch.float16))
    c.per_expert(lambda e: sw, "decoder.block.1.layer.2.mlp",
                 {"wi.weight": (I, H), "wo.weight": (H, I)}, torch.float16, id_fmt="expert_{e}")
    c.add(nl, "model.encoder.layers.3.ffn.router.classifier.weight", rand((3, H), torch.float16))
    c.per_expert(lambda e: nl, "model.encoder.layers.3.ffn",
                 {"fc1.weight": (I, H), "fc1.bias": (I,), "fc2.weight": (H, I), "fc2.bias": (H,)},
                 torch.float16, n=3, id_fmt="expert_{e}")
    c.save({"format": "pt"})
    return c


def main():
    cks = [mixtral(), qwen(), fused(), switch()]
    manifest = {c.name: c.manifest() for c in cks}
    with open(os.path.join(HERE, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, sort_keys=True, separators=(",", ":"))
        fh.write("\n")
    total = 0
    for root, _, files in os.walk(HERE):
        for f in files:
            if f.endswith((".safetensors", ".json")):
                total += os.path.getsize(os.path.join(root, f))
    print(f"wrote {len(cks)} checkpoints, {total} bytes")


if __name__ == "__main__":
    main()
