"""A random-init Qwen2.5-VL with the real 3B / 7B layer shapes but the tiny tokenizer's vocabulary:
realistic compute and memory for timing ZeRO-3 steps where no real checkpoint can be downloaded.

    python benchmarks/shaped_model.py --tiny DIR/model --shape 3b --output SHAPED
"""
import argparse
import os
import shutil
import sys

import torch
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

SHAPES = {  # Qwen2.5-VL-3B / 7B-Instruct text and vision dimensions
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2), vision_out=2048, tie=True),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4), vision_out=3584, tie=False),
}
VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
              fullatt_block_indexes=[7, 15, 23, 31])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", required=True, help="tiny model directory (tokenizer, processor, token ids)")
    parser.add_argument("--shape", choices=list(SHAPES), default="3b")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    config = AutoConfig.from_pretrained(args.tiny)
    for key, value in shape["text"].items():
        setattr(config.text_config, key, value)
    config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    config.text_config.head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    config.text_config.rope_parameters = {**(config.text_config.rope_parameters or {}),
                                          "mrope_section": [16, 24, 24]}
    for key, value in VISION.items():
        setattr(config.vision_config, key, value)
    config.vision_config.out_hidden_size = shape["vision_out"]
    config.tie_word_embeddings = shape["tie"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    print(f"{args.shape}-shaped model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters", flush=True)
    model.save_pretrained(args.output)
    for name in os.listdir(args.tiny):
        if not name.startswith(("model", "config")):
            shutil.copy(os.path.join(args.tiny, name), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
