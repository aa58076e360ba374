"""tests/scripted_model.py's fixed-reply model for any family: Qwen3.5's linear-attention layers have `linear_attn`
(output projection `out_proj`) where the other layers have `self_attn.o_proj`."""
import os
import shutil

import torch

from tests.scripted_model import LOGIT_SCALE, WEIGHT_FILES, reply_chain


def scripted_family_model(base_dir: str, out_dir: str, reply: str) -> str:
    """A copy of the (untied) model in `base_dir` that greedily answers `reply` and then <|im_end|> to any prompt
    rendered with the template's default generation prompt (its last token starts the chain)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(base_dir)
    chain = reply_chain(processor, reply)
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    assert not model.config.tie_word_embeddings
    text_model = model.model.language_model
    assert len(chain) <= text_model.config.hidden_size, "one basis vector per chain token"
    with torch.no_grad():
        for layer in text_model.layers:  # each position's hidden state is its own token's embedding
            attention = layer.linear_attn.out_proj if hasattr(layer, "linear_attn") else layer.self_attn.o_proj
            attention.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text_model.norm.weight.fill_(1.0)
        embeddings, lm_head = text_model.embed_tokens.weight, model.lm_head.weight
        lm_head.zero_()
        for position, (token, next_token) in enumerate(zip(chain, chain[1:])):
            embeddings[token] = 0.0
            embeddings[token, position] = 1.0
            lm_head[next_token, position] = LOGIT_SCALE
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in os.listdir(base_dir):  # tokenizer, processor and chat template, unchanged
        source = os.path.join(base_dir, name)
        if os.path.isfile(source) and name not in WEIGHT_FILES and not name.endswith(".safetensors"):
            shutil.copy(source, os.path.join(out_dir, name))
    return out_dir
