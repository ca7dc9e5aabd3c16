"""The model families moe_infinity offloads, and how each keeps its experts.

Two styles exist in transformers 5:

* ``fused``: one experts module per MoE layer holding 3D parameters
  (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, ...; expert ``e`` is
  slice ``[e]``), computed through the experts interface. On disk the Hub
  keeps one tensor per expert (``experts.3.w1.weight``), which transformers
  concatenates along dim 0 while loading; a region of the engine's slot is
  that same concatenation, so slot views equal the loaded parameters byte for
  byte.
* ``moduledict``: an ``nn.ModuleDict`` of ``expert_{i}`` dense MLPs whose
  ``nn.Linear`` layers hold the weights (SwitchTransformers, NLLB-MoE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UnsupportedError

__all__ = ["Family", "Region", "FAMILIES", "family_for", "supported_model_types"]


@dataclass(frozen=True)
class Region:
    """One region of an expert's slot image.

    Attributes:
        name: for fused experts the parameter name on the experts module
            (``"gate_up_proj"``); for moduledict experts ``"<linear>.<param>"``
            (``"wi.weight"``).
        per_expert: checkpoint roles concatenated along dim 0 in the Hub's
            one-tensor-per-expert layout (``("w1.weight", "w3.weight")``).
        fused: the role in the fused on-disk layout (defaults to ``name``).
    """

    name: str
    per_expert: tuple[str, ...]
    fused: str | None = None

    def parts(self, fused_on_disk: bool) -> list[str]:
        """Checkpoint roles making up this region for the given on-disk layout."""
        if fused_on_disk:
            return [self.fused or self.name]
        return list(self.per_expert)


@dataclass(frozen=True)
class Family:
    """How one transformers model type keeps its routed experts.

    Attributes:
        model_type: ``config.model_type``.
        style: ``"fused"`` or ``"moduledict"``.
        regions: slot regions, in slot order.
        checkpoint_renames: ``(module_path_pattern, checkpoint_pattern)``
            regex pairs turning a module path into the checkpoint prefix of
            older Hub layouts (Mixtral's ``mlp`` is ``block_sparse_moe`` on
            disk).
        seq2seq: encoder-decoder (loaded with AutoModelForSeq2SeqLM).
        linears: for moduledict experts, the ``nn.Linear`` children of each
            expert that hold weights.
        num_experts_attr: the config attribute giving the number of routed
            experts per MoE layer.
        ffn: the experts' computation when it is one the engine's kernels
            implement: ``"swiglu"`` (``down(silu(gate(x)) * up(x))``, gate
            rows before up rows, no biases), ``"gpt_oss"`` (GptOssExperts:
            transposed matrices with interleaved gate/up columns, biases,
            a clamped activation); ``"none"`` otherwise. A fact about the
            family: whether the kernels run is the engine's choice.
    """

    model_type: str
    style: str
    regions: tuple[Region, ...]
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    seq2seq: bool = False
    linears: tuple[str, ...] = field(default=())
    num_experts_attr: str = "num_experts"
    ffn: str = "none"

    def checkpoint_prefixes(self, module_path: str) -> list[str]:
        """Candidate checkpoint prefixes for the MoE module whose experts
        live at ``module_path + ".experts"``, most likely first."""
        out = [module_path]
        for pat, rep in self.checkpoint_renames:
            renamed = re.sub(pat, rep, module_path)
            if renamed not in out:
                out.append(renamed)
        return out


_GATE_UP = (
    Region("gate_up_proj", ("gate_proj.weight", "up_proj.weight")),
    Region("down_proj", ("down_proj.weight",)),
)

FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        "mixtral",
        "fused",
        (Region("gate_up_proj", ("w1.weight", "w3.weight")), Region("down_proj", ("w2.weight",))),
        checkpoint_renames=((r"\.mlp$", ".block_sparse_moe"),),
        num_experts_attr="num_local_experts",
        ffn="swiglu",
    ),
    "qwen2_moe": Family("qwen2_moe", "fused", _GATE_UP, ffn="swiglu"),
    "qwen3_moe": Family("qwen3_moe", "fused", _GATE_UP, ffn="swiglu"),
    "olmoe": Family("olmoe", "fused", _GATE_UP, ffn="swiglu"),
    "deepseek_v3": Family("deepseek_v3", "fused", _GATE_UP, num_experts_attr="n_routed_experts", ffn="swiglu"),
    # GPT-OSS keeps experts fused on disk (transposed, gate/up interleaved,
    # with biases); transformers loads them without conversion.
    "gpt_oss": Family(
        "gpt_oss",
        "fused",
        (
            Region("gate_up_proj", ()),
            Region("gate_up_proj_bias", ()),
            Region("down_proj", ()),
            Region("down_proj_bias", ()),
        ),
        num_experts_attr="num_local_experts",
        ffn="gpt_oss",
    ),
    "switch_transformers": Family(
        "switch_transformers",
        "moduledict",
        (Region("wi.weight", ("wi.weight",)), Region("wo.weight", ("wo.weight",))),
        seq2seq=True,
        linears=("wi", "wo"),
    ),
    "nllb-moe": Family(
        "nllb-moe",
        "moduledict",
        (
            Region("fc1.weight", ("fc1.weight",)),
            Region("fc1.bias", ("fc1.bias",)),
            Region("fc2.weight", ("fc2.weight",)),
            Region("fc2.bias", ("fc2.bias",)),
        ),
        seq2seq=True,
        linears=("fc1", "fc2"),
    ),
}


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values moe_infinity can offload."""
    return sorted(FAMILIES)


def family_for(model_type: str) -> Family:
    """The family of a model type, or UnsupportedError naming the supported ones."""
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise UnsupportedError(
            f"model type {model_type!r} is not a Mixture-of-Experts architecture moe_infinity supports; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return fam
