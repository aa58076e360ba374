"""Forward passes of the policy (and the reference model) over prompt + completion."""
import torch

from step2_trust_grpo.loss import entropy_from_logits, selective_log_softmax
from utils.model import chat_inputs


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


def _encode_images_first(module, inputs: dict) -> torch.Tensor:
    """Run the vision tower before the language model, on every rank, and hand its output to the
    model. Under ZeRO-3 each module's forward (and backward) gathers its parameters collectively, so
    all ranks must run the same modules in the same order: a rank whose micro-batch is text-only
    encodes a dummy image instead, and returns a zero that keeps the tower in its autograd graph.
    Created before the language model runs, that zero is also reached last in backward, where
    a real image's encoding is too."""
    pixel_values = inputs.pop("pixel_values", None)
    if pixel_values is not None:
        inputs["mm_encoder_outputs"] = {
            "image": module.model.get_image_features(pixel_values, inputs["image_grid_thw"], return_dict=True)}
        return torch.zeros((), device=module.device)
    cfg = module.model.visual.config
    grid = torch.tensor([[1, cfg.spatial_merge_size, cfg.spatial_merge_size]], device=module.device)
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    dummy = torch.zeros(int(grid.prod()), patch_dim, dtype=module.model.visual.dtype, device=module.device)
    encoded = module.model.get_image_features(dummy, grid, return_dict=True).pooler_output
    return 0.0 * sum(part.float().sum() for part in encoded)


def completion_logps(model, batch: dict, temperature: float, with_entropy: bool = False):
    """Per-token log-probs (and entropies) of the completion tokens under `model` (a DeepSpeed
    engine or a plain model), at the sampling temperature, shape [B, completion width]. Only the
    completion's logits are materialised."""
    module = getattr(model, "module", model)
    completion = batch["completion_ids"].to(module.device)
    inputs = {k: v.to(module.device) for k, v in batch.items() if k not in ("completion_ids", "completion_mask")}
    keepalive = _encode_images_first(module, inputs)
    width = completion.shape[1]
    logits = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1] / temperature
    logps = selective_log_softmax(logits, completion) + keepalive
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logps, entropy
