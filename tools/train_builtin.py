"""Trains moe_infinity's built-in model: a small Mixtral-architecture MoE
language model whose experts specialise by domain. Not imported by the
package; run it to reproduce python/moe_infinity/builtin_model/.

Corpus (all on the machine, all licensed for redistribution):
  go      Go standard-library sources  (/usr/local/go/src, BSD-3-Clause)
  python  CPython standard library     (lib/python3.X, PSF License)
  prose   license texts and package copyright notices (/usr/share/common-licenses,
          /usr/share/doc/*/copyright) and the Go documentation pages
          (/usr/local/go/doc, text extracted from HTML)

Files are assigned to train / validation by a hash of their path (5%
validation), so the split is stable. The tokenizer is a byte-level BPE
trained with the `tokenizers` library on the training split.

    python tools/train_builtin.py --out python/moe_infinity/builtin_model --minutes 45

Training is time-budgeted: the cosine learning-rate schedule runs over
--minutes of wall time, so the step count (3917 for the shipped model on two
CPU cores) and the exact weights depend on the machine; the data order, split,
tokenizer and initialisation depend only on --seed.

Writes config.json, model.safetensors (bf16), tokenizer files and
training.json (corpus, seed, steps, per-domain validation loss).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

DOMAINS = ("go", "python", "prose")
SPECIALS = ["<pad>", "<s>", "</s>", "<go>", "<python>", "<prose>"]


def _text(p: Path) -> str | None:
    try:
        b = p.read_bytes()
    except OSError:
        return None
    if b"\0" in b[:4096]:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _is_val(path: str) -> bool:
    return int(hashlib.sha1(path.encode()).hexdigest(), 16) % 20 == 0


def collect(max_bytes: int) -> dict[str, dict[str, list[str]]]:
    """{domain: {"train": [...], "val": [...]}} of documents, each domain
    capped at max_bytes (files in sorted order, so runs are reproducible)."""
    goroot = Path("/usr/local/go")
    pylib = Path(torch.__file__).resolve().parents[2]  # lib/python3.X
    sources = {
        "go": sorted(p for p in (goroot / "src").rglob("*.go") if "testdata" not in p.parts and not p.name.endswith("_test.go")),
        "python": sorted(p for p in pylib.glob("**/*.py") if not ({"site-packages", "test", "tests", "idlelib", "lib2to3"} & set(p.parts))),
        "prose": sorted(Path("/usr/share/common-licenses").glob("*"))
        + sorted(Path("/usr/share/doc").glob("*/copyright"))
        + sorted((goroot / "doc").rglob("*.html"))
        + sorted((goroot / "doc").rglob("*.md")),
    }
    out: dict[str, dict[str, list[str]]] = {}
    for dom, files in sources.items():
        seen, size = set(), 0
        docs: dict[str, list[str]] = {"train": [], "val": []}
        for f in files:
            if f.is_dir():
                continue
            t = _text(f)
            if not t or len(t) < 200:
                continue
            if f.suffix == ".html":
                t = html.unescape(re.sub(r"<[^>]+>", "", t))
            h = hashlib.sha1(t.encode()).digest()
            if h in seen:  # many packages ship the same license text
                continue
            seen.add(h)
            docs["val" if _is_val(str(f)) else "train"].append(t)
            size += len(t)
            if size >= max_bytes:
                break
        out[dom] = docs
    return out


def train_tokenizer(corpus: dict, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [d for dom in DOMAINS for d in corpus[dom]["train"]]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def encode(tok, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids += [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def batches(streams: dict[str, torch.Tensor], seq: int, per_domain: int, rng: random.Random):
    while True:
        rows = []
        for dom in DOMAINS:
            s = streams[dom]
            for _ in range(per_domain):
                i = rng.randrange(0, len(s) - seq - 1)
                rows.append(s[i : i + seq])
        yield torch.stack(rows)


@torch.no_grad()
def val_loss(model, streams: dict[str, torch.Tensor], seq: int, n: int = 24) -> dict[str, float]:
    model.eval()
    out = {}
    for dom in DOMAINS:
        s = streams[dom]
        starts = torch.linspace(0, len(s) - seq - 1, n).long().tolist()
        x = torch.stack([s[i : i + seq] for i in starts])
        out[dom] = float(model(input_ids=x, labels=x).loss)
    model.train()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=45, help="wall-time budget; the learning-rate schedule spans it")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--domain-bytes", type=int, default=12_000_000, help="bytes of each domain to collect (the shipped model: 12000000)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--per-domain", type=int, default=4, help="sequences of each domain per batch")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    from transformers import MixtralConfig, MixtralForCausalLM

    t0 = time.time()
    corpus = collect(args.domain_bytes)
    sizes = {d: {k: sum(len(x) for x in v) for k, v in corpus[d].items()} for d in DOMAINS}
    print("corpus bytes", json.dumps(sizes), flush=True)
    tok = train_tokenizer(corpus, args.vocab)
    train = {d: encode(tok, corpus[d]["train"]) for d in DOMAINS}
    val = {d: encode(tok, corpus[d]["val"]) for d in DOMAINS}
    print("tokens", {d: (len(train[d]), len(val[d])) for d in DOMAINS}, f"prep {time.time() - t0:.0f}s", flush=True)

    cfg = MixtralConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
        tie_word_embeddings=True, router_aux_loss_coef=0.02, output_router_logits=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = MixtralForCausalLM(cfg).train()
    print("parameters", sum(p.numel() for p in model.parameters()), flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    it = batches(train, args.seq, args.per_domain, rng)
    deadline = time.time() + args.minutes * 60
    warm = 100
    step = 0
    history = []
    est_total = args.max_steps
    while step < args.max_steps and time.time() < deadline:
        frac = min(1.0, (time.time() - (deadline - args.minutes * 60)) / (args.minutes * 60))
        lr = args.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(it)
        out = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {out.loss.item():.3f} lr {lr:.2e} t {time.time() - t0:.0f}s", flush=True)
        if step % 500 == 0:
            v = val_loss(model, val, args.seq)
            history.append({"step": step, "val": v})
            print("val", step, json.dumps(v), flush=True)
    final = val_loss(model, val, args.seq)
    print("final val", json.dumps(final), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps({
        "corpus": {"go": "Go standard library sources (/usr/local/go/src, BSD-3-Clause)",
                   "python": "CPython standard library (PSF License)",
                   "prose": "license texts (/usr/share/common-licenses), /usr/share/doc/*/copyright, Go documentation pages"},
        "corpus_bytes": sizes, "tokens": {d: [len(train[d]), len(val[d])] for d in DOMAINS},
        "seed": args.seed, "steps": step, "seq": args.seq, "batch": args.per_domain * len(DOMAINS),
        "tokens_seen": step * args.seq * args.per_domain * len(DOMAINS), "lr": args.lr,
        "minutes": round((time.time() - t0) / 60, 1), "final_val_loss": final, "history": history,
        "command": " ".join(sys.argv),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
