"""The small built-in model used when no ``--model`` is given, so that the
command line works offline on any machine.

The package ships a small trained Mixtral-architecture model in
``builtin_model/`` (4 MoE layers × 8 experts, 11.3M parameters, bfloat16,
22.6 MB), trained from scratch by tools/train_builtin.py on Go and Python
standard-library sources and English license/documentation text from this
machine; its experts specialise by domain (see BENCHMARKS.md, "The built-in
model"). ``builtin_model/training.json`` records the corpus, seed, steps and
validation loss.
"""

from __future__ import annotations

from pathlib import Path

from .errors import NotFoundError

_VOCAB_CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


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


#: Where the trained model lives inside the package.
PACKAGED = Path(__file__).resolve().parent / "builtin_model"


def packaged_model_dir() -> Path | None:
    """The trained model shipped in the package, if present."""
    if (PACKAGED / "config.json").is_file() and any(PACKAGED.glob("*.safetensors")):
        return PACKAGED
    return None


def builtin_model_dir() -> Path:
    """Directory of the built-in model shipped in the package.

    Raises NotFoundError when the package was installed without it (for
    example from a source tree whose ``builtin_model/`` was deleted)."""
    packaged = packaged_model_dir()
    if packaged is None:
        raise NotFoundError(
            f"the built-in model is missing from {PACKAGED} (reinstall moe_infinity, "
            "or rebuild it with tools/train_builtin.py); pass --model DIR to use another model"
        )
    return packaged
