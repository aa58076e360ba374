"""Loading the policy / TRM and its processor, and turning chat messages into model inputs."""
import importlib
import logging
import os

import torch

from sophiavl.utils.cli import InputError
from sophiavl.utils.model_family import family_of
from sophiavl.utils.prompts import POLICY_THINKING


def default_dtype() -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 matmuls are slow on most CPUs and break exact-match tests)."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return default_dtype()
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise InputError(f"--dtype {name}: choose auto, float32, bfloat16 or float16")
    return choices[name]


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """AutoProcessor with min/max pixels set and left padding (batched generation).

    transformers 5 deprecates min_pixels/max_pixels as call-time kwargs: they become the image
    processor's `size` (shortest_edge = min pixels, longest_edge = max pixels), set here once."""
    from transformers import AutoProcessor
    from transformers.image_utils import SizeDict

    try:
        processor = AutoProcessor.from_pretrained(path)
    except OSError as err:
        raise InputError(f"cannot load a processor from {path}: {err}".splitlines()[0]) from err
    size = {k: v for k, v in vars(processor.image_processor.size).items() if v is not None}
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size.get("shortest_edge", 0) > size.get("longest_edge", float("inf")):
        raise InputError(f"--min-pixels {size['shortest_edge']} is larger than --max-pixels {size['longest_edge']}")
    processor.image_processor.size = SizeDict(**size)
    processor.tokenizer.padding_side = "left"
    return processor


def _flash_attn_importable() -> bool:
    try:  # a real import: a wheel built for another torch is installed but fails to load its CUDA library
        importlib.import_module("flash_attn")
    except Exception:
        return False
    return True


def resolve_attn_implementation(name: str) -> str:
    """--attn-implementation: "auto" is flash_attention_2 where CUDA is there and flash_attn imports, else sdpa
    (flash-attn is an optional install, docs/gpu_install.md); any other name goes to transformers as it is."""
    if name == "auto":
        return "flash_attention_2" if torch.cuda.is_available() and _flash_attn_importable() else "sdpa"
    if name == "flash_attention_2" and not _flash_attn_importable():
        raise InputError("--attn-implementation flash_attention_2 needs the flash_attn package, which does not import "
                         "here: install requirements-flash-attn.txt, or use auto (sdpa without it)")
    return name


def load_model(path: str, dtype: torch.dtype, attn_implementation: str = "auto", hf_ds_config=None):
    """AutoModelForImageTextToText in `dtype`, attention by resolve_attn_implementation. Under ZeRO-3 pass
    `hf_ds_config` (a transformers HfDeepSpeedConfig): transformers then loads the weights straight into shards, but
    only while that object is alive, so we keep a reference on the model."""
    from transformers import AutoModelForImageTextToText

    if os.path.isfile(os.path.join(path, "config.json")):
        family_of(path)  # an unsupported model_type is one line here, not a failure deep in a step
    attn_implementation = resolve_attn_implementation(attn_implementation)
    logging.getLogger(__name__).info("attention implementation: %s", attn_implementation)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as err:
        raise InputError(f"cannot load a model from {path}: {err}".splitlines()[0]) from err
    model.hf_ds_config = hf_ds_config
    return model


ASSISTANT_HEADER = "<|im_start|>assistant\n"  # every supported family's template opens the answer so
THINK_TAGS = ("<think>", "</think>")


def chat_texts(processor, batch_messages: list, *, enable_thinking: bool, add_generation_prompt: bool = True) -> list:
    """Each chat through the processor's chat template, as text. The switch goes only to a template that reads it
    (transformers logs a warning per call for a variable the template lacks)."""
    switch = {"enable_thinking": enable_thinking} if "enable_thinking" in str(processor.chat_template) else {}
    return [processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          **switch) for messages in batch_messages]


def chat_inputs(processor, batch_messages: list, batch_images: list, add_generation_prompt: bool = True, *,
                enable_thinking: bool = POLICY_THINKING):
    """Tokenize a batch of chats (each with its own list of PIL images) into padded model inputs,
    including `mm_token_type_ids`, which mRoPE needs to place the image tokens."""
    texts = chat_texts(processor, batch_messages, enable_thinking=enable_thinking,
                       add_generation_prompt=add_generation_prompt)
    images = [image for row_images in batch_images for image in row_images]
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt")


def template_prefill(prompt_text: str) -> str:
    """What a rendered generation prompt already wrote of the answer: the text after its last assistant header.
    "<think>\n" from Qwen3.5's thinking template, "<think>\n\n</think>\n\n" with its thinking off, "" from the
    Qwen2/2.5/3-VL-Instruct templates. The response that rewards, the judge and the logs see is this prefill and
    then the completion (the model never generates the prefill, so a format check on the completion alone fails)."""
    at = prompt_text.rfind(ASSISTANT_HEADER)
    return prompt_text[at + len(ASSISTANT_HEADER):] if at != -1 else ""


def decode_completions(tokenizer, token_ids: list) -> list[str]:
    """batch_decode(skip_special_tokens=True), except that <think> and </think> stay where the tokenizer counts them
    special (Qwen3.5's vocabulary does): skipping them would make every response fail the format check."""
    kept = {tokenizer.convert_tokens_to_ids(tag): tag for tag in THINK_TAGS if tag in tokenizer.all_special_tokens}
    if not kept:
        return tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    texts = []
    for ids in token_ids:
        pieces, run = [], []
        for token in ids:
            if token in kept:
                pieces += [tokenizer.decode(run, skip_special_tokens=True), kept[token]]
                run = []
            else:
                run.append(token)
        texts.append("".join(pieces) + tokenizer.decode(run, skip_special_tokens=True))
    return texts


def encode_images_first(module, inputs: dict) -> torch.Tensor:
    """Run the vision tower before the language model, on every rank, and hand its output to the
    model. Under ZeRO-3 each module's forward (and backward) gathers its parameters collectively, so
    all ranks must run the same modules in the same order: a rank whose micro-batch is text-only
    encodes a dummy image instead, and returns a zero that keeps the tower in its autograd graph.
    Created before the language model runs, that zero is also reached last in backward, where
    a real image's encoding is too. Callers add the returned zero to their loss terms."""
    pixel_values = inputs.pop("pixel_values", None)
    image_index = inputs.pop("image_index", None)  # slot -> distinct image, when images are shared
    if pixel_values is not None:
        grid = inputs["image_grid_thw"]
        if image_index is not None:  # encode each distinct image once, then fill every slot that shows it
            first_slots = [image_index.tolist().index(d) for d in range(int(image_index.max()) + 1)]
            grid = grid[first_slots]
        encoded = module.model.get_image_features(pixel_values, grid, return_dict=True)
        if image_index is not None:
            slots = image_index.tolist()
            encoded.pooler_output = tuple(encoded.pooler_output[d] for d in slots)
            if getattr(encoded, "deepstack_features", None):  # Qwen3-VL: per merger, one tensor per image
                encoded.deepstack_features = [tuple(per_image[d] for d in slots)
                                              for per_image in encoded.deepstack_features]
        inputs["mm_encoder_outputs"] = {"image": encoded}
        return torch.zeros((), device=module.device)
    cfg = module.model.visual.config
    grid = torch.tensor([[1, cfg.spatial_merge_size, cfg.spatial_merge_size]], device=module.device)
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    dummy = torch.zeros(int(grid.prod()), patch_dim, dtype=module.model.visual.dtype, device=module.device)
    encoded = module.model.get_image_features(dummy, grid, return_dict=True)
    # Qwen3-VL's deepstack mergers ran too: their parameters must be in the graph like the main merger's
    parts = list(encoded.pooler_output) + [t for per_image in getattr(encoded, "deepstack_features", None) or []
                                           for t in per_image]
    return 0.0 * sum(part.float().sum() for part in parts)


def apply_training_flags(model, *, freeze_vision_tower: bool, gradient_checkpointing: bool) -> None:
    if freeze_vision_tower:
        model.model.visual.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # checkpointed blocks need inputs that require grad
