"""Forward passes of the policy (and the reference model) over prompt + completion."""
import torch

from step2_trust_grpo.loss import entropy_from_logits, selective_log_softmax
from utils.model import chat_inputs, encode_images_first


def completion_batch(processor, chats: list, images: list, completion_ids: list[list[int]]) -> dict:
    """Model inputs for prompts (left-padded by the processor) followed by their completions
    (right-padded), plus `completion_mask` marking the completion tokens that carry loss."""
    prompt = chat_inputs(processor, chats, images)
    pad = processor.tokenizer.pad_token_id
    width = max(len(ids) for ids in completion_ids)
    completion = torch.full((len(completion_ids), width), pad, dtype=torch.long)
    completion_mask = torch.zeros_like(completion)
    for row, ids in enumerate(completion_ids):
        completion[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[row, :len(ids)] = 1
    batch = dict(prompt)
    batch["input_ids"] = torch.cat([prompt["input_ids"], completion], dim=1)
    batch["attention_mask"] = torch.cat([prompt["attention_mask"], completion_mask], dim=1)
    batch["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    batch["completion_ids"], batch["completion_mask"] = completion, completion_mask
    return batch


def completion_logps(model, batch: dict, temperature: float, with_entropy: bool = False):
    """Per-token log-probs (and entropies) of the completion tokens under `model` (a DeepSpeed
    engine or a plain model), at the sampling temperature, shape [B, completion width]. Only the
    completion's logits are materialised."""
    module = getattr(model, "module", model)
    completion = batch["completion_ids"].to(module.device)
    inputs = {k: v.to(module.device) for k, v in batch.items() if k not in ("completion_ids", "completion_mask")}
    keepalive = encode_images_first(module, inputs)
    width = completion.shape[1]
    logits = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1] / temperature
    logps = selective_log_softmax(logits, completion) + keepalive
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logps, entropy
