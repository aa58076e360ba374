"""The policy forward over prompt + completion: images shared by a prompt's N completions are encoded
once, with the same log-probs and gradients as encoding every copy."""
import pytest
import torch

from step2_trust_grpo.policy import completion_batch, completion_logps
from sophiavl.utils.data import load_rows, open_images
from sophiavl.utils.model import load_model, load_processor
from sophiavl.utils.prompts import policy_messages


@pytest.fixture(scope="module")
def setup(tiny_assets):
    processor = load_processor(tiny_assets["model"])
    rows = [r for r in load_rows("tiny_test", tiny_assets["registry"]) if r["images"]][:2]
    return processor, rows


def logps_and_vision_grads(model, processor, rows, images, n=3):
    chats = [policy_messages(r["prompt"], r["problem_type"], r["options"], len(i)) for r, i in zip(rows, images)]
    ids = [processor.tokenizer.encode(f"<think>x{k}</think><answer>B</answer>") for k in range(len(rows) * n)]
    batch = completion_batch(processor, [chats[j // n] for j in range(len(ids))],
                             [images[j // n] for j in range(len(ids))], ids)
    model.zero_grad()
    logps, _ = completion_logps(model, batch, temperature=1.0)
    (logps * batch["completion_mask"]).sum().backward()
    return batch, logps.detach(), [p.grad.clone() for p in model.model.visual.parameters()]


def test_shared_images_are_encoded_once_with_identical_logps_and_gradients(setup, tiny_assets):
    processor, rows = setup
    model = load_model(tiny_assets["model"], torch.float32)
    shared = [open_images(r) for r in rows]  # the N completions of a prompt reuse these objects
    batch, logps, grads = logps_and_vision_grads(model, processor, rows, shared)
    patches_per_image = int(batch["image_grid_thw"][0].prod())
    assert batch["pixel_values"].shape[0] == 2 * patches_per_image  # 2 distinct images, not 6
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1]

    chats = [policy_messages(r["prompt"], r["problem_type"], r["options"], 1) for r in rows]
    ids = [processor.tokenizer.encode(f"<think>x{k}</think><answer>B</answer>") for k in range(6)]
    unshared = [[image.copy() for image in shared[j // 3]] for j in range(6)]  # a new object per completion
    batch_all = completion_batch(processor, [chats[j // 3] for j in range(6)], unshared, ids)
    assert batch_all["pixel_values"].shape[0] == 6 * patches_per_image
    model.zero_grad()
    logps_all, _ = completion_logps(model, batch_all, temperature=1.0)
    (logps_all * batch_all["completion_mask"]).sum().backward()
    assert torch.allclose(logps, logps_all.detach(), atol=1e-6)
    for mine, theirs in zip(grads, (p.grad for p in model.model.visual.parameters())):
        assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-7)
