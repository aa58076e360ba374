"""Loading the policy / TRM and its processor, and turning chat messages into model inputs."""
import torch

from utils.cli import InputError


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


def load_model(path: str, dtype: torch.dtype, attn_implementation: str = "sdpa", hf_ds_config=None):
    """AutoModelForImageTextToText in `dtype`. Under ZeRO-3 pass `hf_ds_config` (a
    transformers HfDeepSpeedConfig): transformers then loads the weights straight into shards, but
    only while that object is alive, so we keep a reference on the model."""
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as err:
        raise InputError(f"cannot load a model from {path}: {err}".splitlines()[0]) from err
    model.hf_ds_config = hf_ds_config
    return model


def chat_inputs(processor, batch_messages: list, batch_images: list, add_generation_prompt: bool = True):
    """Tokenize a batch of chats (each with its own list of PIL images) into padded model inputs,
    including `mm_token_type_ids`, which mRoPE needs to place the image tokens."""
    texts = [
        processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        for messages in batch_messages
    ]
    images = [image for row_images in batch_images for image in row_images]
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
