"""A copy of the tiny model whose greedy output is a fixed reply, whatever the prompt.

Every decoder layer's attention o_proj and MLP down_proj are zeroed, so each position's hidden state
is its own token's embedding carried through the residual stream. The chain's tokens get distinct
basis-vector embeddings and an untied lm_head maps each to the next one: the generation prompt's last
token -> reply token 1 -> ... -> reply token n -> <|im_end|> (end of turn). Real weights, saved with
save_pretrained, so both transformers and vLLM load it like any checkpoint.
"""
import os
import shutil

import torch

LOGIT_SCALE = 10.0  # the chain's next token wins by ~LOGIT_SCALE * sqrt(hidden); every other logit is 0
WEIGHT_FILES = ("config.json", "generation_config.json")


def generation_prompt_last_token(processor) -> int:
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                         tokenize=False, add_generation_prompt=True)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"][-1]


def reply_chain(processor, reply: str, end: str = "<|im_end|>", then: str = "") -> list[int]:
    """[prompt's last token, reply tokens..., `end` token, `then` tokens...]; all distinct. `then` is what the
    model goes on to say after `end` when an engine does not stop there."""
    tokenizer = processor.tokenizer
    reply_ids = tokenizer.encode(reply, add_special_tokens=False)
    assert tokenizer.decode(reply_ids) == reply, f"{reply!r} does not round-trip through the tokenizer"
    chain = [generation_prompt_last_token(processor), *reply_ids, tokenizer.convert_tokens_to_ids(end),
             *tokenizer.encode(then, add_special_tokens=False)]
    assert len(set(chain)) == len(chain), f"chain tokens must be distinct: {[tokenizer.decode([i]) for i in chain]}"
    return chain


def scripted_model(base_dir: str, out_dir: str, reply: str = "<think>x</think><answer>B</answer>",
                   end: str = "<|im_end|>", then: str = "") -> str:
    """Write to `out_dir` a copy of the model in `base_dir` that greedily answers `reply` to any prompt, then
    `end`, then `then`."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(base_dir)
    chain = reply_chain(processor, reply, end, then)
    base = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    config = AutoConfig.from_pretrained(base_dir)
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # lm_head: filled below
    model.generation_config = base.generation_config

    text_model = model.model.language_model
    hidden = text_model.config.hidden_size
    assert len(chain) <= hidden, "one basis vector per chain token"
    with torch.no_grad():
        for layer in text_model.layers:  # each position's hidden state is its own token's embedding
            # Qwen3.5's linear-attention layers project out with linear_attn.out_proj, the others self_attn.o_proj
            attention = layer.linear_attn.out_proj if hasattr(layer, "linear_attn") else layer.self_attn.o_proj
            attention.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text_model.norm.weight.fill_(1.0)
        embeddings, lm_head = text_model.embed_tokens.weight, model.lm_head.weight
        lm_head.zero_()
        for position, (token, next_token) in enumerate(zip(chain, chain[1:])):
            embeddings[token] = 0.0
            embeddings[token, position] = 1.0
            lm_head[next_token] = 0.0
            lm_head[next_token, position] = LOGIT_SCALE

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in os.listdir(base_dir):  # tokenizer, processor and chat template, unchanged
        source = os.path.join(base_dir, name)
        if os.path.isfile(source) and name not in WEIGHT_FILES and not name.endswith(".safetensors"):
            shutil.copy(source, os.path.join(out_dir, name))
    return out_dir
