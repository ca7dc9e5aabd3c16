"""The small built-in model used when no ``--model`` is given, so that the
command line works offline on any machine.

The package ships a small trained Mixtral-architecture model in
``builtin_model/`` (4 MoE layers × 8 experts, trained by
tools/train_builtin.py on Go and Python standard-library sources and English
license/documentation text; its experts specialise by domain). A checkout
without it falls back to a seeded random model written to the cache
directory, whose output is not meaningful text.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("moe_infinity")

BUILTIN_NAME = "builtin-random-mixtral-v1"
_VOCAB_CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def cache_dir() -> Path:
    """moe_infinity's cache directory (``$MOE_INFINITY_CACHE`` or ``~/.cache/moe_infinity``)."""
    env = os.environ.get("MOE_INFINITY_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe_infinity"


def char_tokenizer(extra_chars: list[str] | None = None):
    """A character-level fast tokenizer: ``<pad>``=0, ``<s>``=1, ``</s>``=2,
    then one id per character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(extra_chars) if extra_chars is not None else _VOCAB_CHARS
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>")


PACKAGED = Path(__file__).resolve().parent / "builtin_model"


def packaged_model_dir() -> Path | None:
    """The trained model shipped in the package, if present."""
    if (PACKAGED / "config.json").is_file() and any(PACKAGED.glob("*.safetensors")):
        return PACKAGED
    return None


def builtin_model_dir() -> Path:
    """Directory of the built-in model: the packaged trained model, or a
    random one built into the cache directory on first use."""
    packaged = packaged_model_dir()
    if packaged is not None:
        return packaged
    target = cache_dir() / BUILTIN_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    log.info("building the built-in model in %s", target)
    tok = char_tokenizer()
    cfg = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=BUILTIN_NAME + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
