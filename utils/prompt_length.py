"""Prompt lengths in tokens as the model sees them, measured when the data is loaded, without decoding an image.

The chat template writes each image as one `<|image_pad|>`, which the processor expands to the image's token
count; that count follows from the image's size alone (utils.vision.image_token_count: the resized grid after the
2x2 merge), and the size from the file's header.
"""
import io
import logging
from collections import Counter

from sophiavl.utils.cli import InputError
from sophiavl.utils.model import chat_texts
from sophiavl.utils.vision import image_token_count

logger = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"


def image_sizes(row: dict) -> list[tuple[int, int]]:
    """(width, height) of each image of a row, from the file's header."""
    from PIL import Image

    sizes = []
    for ref in row["images"]:
        with Image.open(io.BytesIO(ref["bytes"]) if ref["bytes"] is not None else ref["path"]) as image:
            sizes.append(image.size)
    return sizes


def prompt_lengths(processor, rows: list, chat_of, at_most: int | None = None, batch_size: int = 512, *,
                   enable_thinking: bool = True) -> list[int]:
    """Tokens of each row's prompt: `chat_of(row)` through the chat template (with the generation prompt), each
    image expanded to its token count. An image no grid fits (aspect ratio over 200) is an InputError.

    With `at_most`, a prompt that provably fits gets an upper bound instead (its characters: tokenizing is most of
    the cost, and with Qwen's byte-level BPE an ASCII text has at most one token per character); every length over
    `at_most` is exact. `enable_thinking`: the template's thinking switch as the stage sets it (utils.model:
    POLICY_THINKING, the default here, or JUDGE_THINKING)."""
    tokenizer = processor.tokenizer
    bounded = at_most is not None and _at_most_one_token_per_ascii_char(tokenizer)
    tokens_of_size = {}  # images of one dataset often share a size
    lengths = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        texts = chat_texts(processor, [chat_of(row) for row in batch], enable_thinking=enable_thinking)
        image_tokens = []  # what the images add beyond their one <|image_pad|> each
        for row, text in zip(batch, texts):
            sizes = image_sizes(row)
            if text.count(IMAGE_PAD) != len(sizes):
                raise InputError(f"dataset {row['dataset']}, row id {row['id']}: the chat template wrote "
                                 f"{text.count(IMAGE_PAD)} image tokens for {len(sizes)} images")
            for size in sizes:
                if size not in tokens_of_size:
                    try:
                        tokens_of_size[size] = image_token_count(*size, processor)
                    except ValueError as err:  # smart_resize's refusal
                        raise InputError(f"dataset {row['dataset']}, row id {row['id']}: an image of "
                                         f"{size[0]}x{size[1]} pixels: {err}") from None
            image_tokens.append(sum(tokens_of_size[size] - 1 for size in sizes))
        bounds = [len(text) + extra if bounded and text.isascii() else None for text, extra in zip(texts, image_tokens)]
        exact = [k for k, bound in enumerate(bounds) if bound is None or bound > at_most]
        ids = tokenizer([texts[k] for k in exact], add_special_tokens=False)["input_ids"] if exact else []
        for k, row_ids in zip(exact, ids):
            bounds[k] = len(row_ids) + image_tokens[k]
        lengths += bounds
    return lengths


def _at_most_one_token_per_ascii_char(tokenizer) -> bool:
    """Byte-level BPE (every token at least one byte, no prefix space added) behind no normalizer or NFC (which
    leaves ASCII as it is): Qwen's tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return False
    normalizer = backend.normalizer.__getstate__() if backend.normalizer is not None else b'{"type":"NFC"}'
    pre_tokenizer = backend.pre_tokenizer.__getstate__()
    return normalizer == b'{"type":"NFC"}' and b'"type":"ByteLevel"' in pre_tokenizer and \
        b'"add_prefix_space":true' not in pre_tokenizer


def sharded_prompt_lengths(processor, rows: list, chat_of, at_most: int | None = None, *,
                           enable_thinking: bool = True) -> list[int]:
    """prompt_lengths with each rank measuring 1/world of the rows, gathered (ranks of a node share its cores)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return prompt_lengths(processor, rows, chat_of, at_most, enable_thinking=enable_thinking)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shards = [None] * world_size
    dist.all_gather_object(shards, prompt_lengths(processor, rows[rank::world_size], chat_of, at_most,
                                                  enable_thinking=enable_thinking))
    lengths = [0] * len(rows)
    for shard_rank, shard in enumerate(shards):
        lengths[shard_rank::world_size] = shard
    return lengths


def drop_over_long(rows: list, lengths: list, max_length: int, flag: str, what: str, log: bool = True) -> list:
    """The rows of at most `max_length` tokens. The others are reported in one warning line (how many, per dataset,
    the longest); when none is left, an InputError. `flag` names the limit, `what` the rows, in the messages."""
    dropped = [(length, row) for length, row in zip(lengths, rows) if length > max_length]
    if len(dropped) == len(rows):
        raise InputError(f"{what}: all {len(rows)} prompts are longer than {flag} {max_length} tokens "
                         f"(the shortest has {min(lengths)})")
    if dropped and log:
        longest, row = max(dropped, key=lambda pair: pair[0])
        per_dataset = Counter(row["dataset"] for _, row in dropped)
        logger.warning("%s: dropped %d of %d prompts longer than %s %d tokens (%s); the longest, row id %s of %s, "
                       "has %d tokens", what, len(dropped), len(rows), flag, max_length,
                       ", ".join(f"{name} {count}" for name, count in per_dataset.items()), row["id"],
                       row["dataset"], longest)
    return [row for length, row in zip(lengths, rows) if length <= max_length]


def keep_within(processor, rows: list, chat_of, max_length: int, flag: str, what: str, log: bool = True) -> list:
    """drop_over_long on the rows' measured lengths (shared out over the ranks when there are several)."""
    return drop_over_long(rows, sharded_prompt_lengths(processor, rows, chat_of, max_length), max_length, flag, what,
                          log)
