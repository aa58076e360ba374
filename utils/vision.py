"""The images a model sees: resized once, by the Qwen-VL processor's own rule, before any engine gets them.

qwen-vl-utils' `fetch_image` (the resize the Qwen cookbook, VLMEvalKit and EasyR1 use) snaps each side to a multiple
of patch x merge (28 for Qwen2/2.5-VL, 32 for Qwen3-VL's 16-pixel patches) within the processor's min/max pixels.
The processors of both engines then find the image already on that grid and within the limits and keep its size, so
the training forward, the hf engine and vLLM all see the same pixels, whatever limits the checkpoint's own
preprocessor_config.json carries.
"""
from qwen_vl_utils import fetch_image

from sophiavl.utils.cli import InputError


def pixel_limits(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the processor, as utils.model.load_processor set them."""
    size = processor.image_processor.size
    return size.shortest_edge, size.longest_edge


def patch_factor(processor) -> int:
    """The side length an image must be a multiple of: patch size x spatial merge size."""
    image_processor = processor.image_processor
    return image_processor.patch_size * image_processor.merge_size


def resize_images(images: list, processor) -> list:
    """Each PIL image resized to the grid the processor would pick (RGB, alpha over white)."""
    min_pixels, max_pixels = pixel_limits(processor)
    image_processor = processor.image_processor
    if image_processor.merge_size != 2:  # fetch_image's grid is patch x 2
        raise InputError(f"spatial merge size {image_processor.merge_size} is not supported (Qwen-VL uses 2)")
    resized = []
    for image in images:
        try:
            resized.append(fetch_image({"image": image, "min_pixels": min_pixels, "max_pixels": max_pixels},
                                       image_patch_size=image_processor.patch_size))
        except ValueError as err:  # an aspect ratio over 200: no grid fits
            raise InputError(f"image of {image.width}x{image.height} pixels: {err}") from None
    return resized


def image_token_count(width: int, height: int, processor) -> int:
    """Placeholder tokens an image of this size takes in the prompt (after the resize and the 2x2 merge)."""
    from qwen_vl_utils import smart_resize

    min_pixels, max_pixels = pixel_limits(processor)
    factor = patch_factor(processor)
    resized_height, resized_width = smart_resize(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return resized_height * resized_width // factor ** 2
