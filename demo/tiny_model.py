"""A random-init Qwen2.5-VL small enough to train on 2 CPU cores, with its own tokenizer and processor.

Sizes are ones seen to learn the synthetic tasks in minutes: text hidden 128 with head size 32
(vLLM's CPU attention needs >= 32), a 2-block vision tower, 112x112 images (16 image tokens after
the 2x2 merge); ~1.7M parameters, ~7 MB in fp32.
The tokenizer is Qwen2's pipeline (its pre-tokenizer regex + byte-level BPE) trained on the task
texts, with Qwen's special tokens and two kinds of plain (non-special) added tokens:
- `<think>`, `</think>`, `<answer>`, `</answer>`: single tokens that decode(skip_special_tokens=True)
  keeps, or every outcome reward would be 0;
- each verbatim piece of the fixed prompts (the text between tags and placeholders): the policy
  template is ~600 characters and the TRM prompt ~1,350, which would otherwise be hundreds of
  tokens per prompt for a model whose answers are ~15 tokens.
"""
import os
import re

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2.5-VL's special tokens, in its order (ids differ: here they come first).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
PLACEHOLDERS = ["{Question}", "{question}", "{response}"]
# Qwen2's pre-tokenizer (transformers' Qwen2Tokenizer uses the same one).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
MIN_FIXED_PIECE_CHARS = 12  # shorter pieces (" ", " tags.") stay ordinary text

# Qwen2.5-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PIXELS = 112 * 112

TEXT_CONFIG = dict(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384,
    max_position_embeddings=8192, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 4, 4]},
)
VISION_CONFIG = dict(
    depth=2, hidden_size=128, num_heads=4, intermediate_size=256, patch_size=14, spatial_merge_size=2,
    temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1], out_hidden_size=128,
)

_SPLIT_PATTERN = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + TAG_TOKENS + PLACEHOLDERS))


def fixed_pieces(fixed_texts: list[str]) -> list[str]:
    """The verbatim runs of text between tags and placeholders in the fixed prompts."""
    pieces = {piece for text in fixed_texts for piece in _SPLIT_PATTERN.split(text)}
    return sorted(piece for piece in pieces if len(piece.strip()) >= MIN_FIXED_PIECE_CHARS)


def train_tokenizer(corpus_texts: list[str], fixed_texts: list[str], vocab_size: int = 2000) -> Tokenizer:
    """Byte-level BPE on the corpus (tags and placeholders cut out first), then the added tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = list(corpus_texts) + list(fixed_texts) + [DEFAULT_SYSTEM_PROMPT, "system", "user", "assistant"]
    pieces = [piece for text in texts for piece in _SPLIT_PATTERN.split(text) if piece]
    tokenizer.train_from_iterator(pieces, trainer)
    plain = TAG_TOKENS + fixed_pieces(list(fixed_texts) + [DEFAULT_SYSTEM_PROMPT])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in plain])
    return tokenizer


def make_processor(tokenizer_object: Tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = Qwen2Tokenizer(
        tokenizer_object=tokenizer_object, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, model_max_length=8192, chat_template=CHAT_TEMPLATE,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")],
    )
    pixels = dict(min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=CHAT_TEMPLATE,
    )


def make_model(tokenizer, seed: int):
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    token_ids = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=dict(TEXT_CONFIG, vocab_size=len(tokenizer), **token_ids),
        vision_config=VISION_CONFIG,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,  # as Qwen2.5-VL-7B, the policy (the 3B ties: demo/real_shaped_model.py)
        **token_ids,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    # Stop on <|im_end|> (end of turn) or <|endoftext|>, as Qwen2.5-VL-Instruct does; no sampling
    # defaults, because vLLM would pick them up as its default sampling parameters.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
    )
    return model


def build_tiny_model(out_dir: str, corpus_texts: list[str], seed: int = 0, fixed_texts: list[str] = ()) -> str:
    """Train the tokenizer on `corpus_texts` (+ `fixed_texts`, the verbatim prompts), init the model
    with `seed` and save model, tokenizer and processor to `out_dir` (fp32 safetensors, ~7 MB)."""
    os.makedirs(out_dir, exist_ok=True)
    processor = make_processor(train_tokenizer(corpus_texts, fixed_texts))
    model = make_model(processor.tokenizer, seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
