"""How one step's completions on a rank are cut into micro-batches for the reference, old and training passes: a
fixed count each (--micro-batch-size), or as many as fit a token budget (--max-tokens-per-micro-batch), so that a
few long completions do not pad all the others to their length.

Regrouping changes any per-micro-batch mean, so a token budget needs a step-global loss aggregation (arguments.py
checks it). Under ZeRO-3 every rank must run as many forward and backward passes as the others, or the parameter
gathers of the extra passes wait forever: all ranks plan the same number of micro-batches."""
from sophiavl.utils.vision import image_token_count


def sequence_lengths(processor, prompt_texts: list, images: list, completion_ids: list, num_generations: int) -> list:
    """Tokens of each completion's training row: its prompt (each image expanded to its token count) and itself.
    prompt_texts / images are per prompt, completion_ids per completion (num_generations per prompt)."""
    tokenized = processor.tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    prompts = [len(ids) + sum(image_token_count(*image.size, processor) - 1 for image in row_images)
               for ids, row_images in zip(tokenized, images)]
    return [prompts[j // num_generations] + len(ids) for j, ids in enumerate(completion_ids)]


def fixed_count(num_rows: int, size: int) -> list:
    return [list(range(i, min(i + size, num_rows))) for i in range(0, num_rows, size)]


def token_budget(lengths: list, budget: int) -> list:
    """Longest rows first; each micro-batch takes rows while (its rows) x (its longest row) stays within `budget`
    padded tokens. A row longer than the budget goes alone."""
    batches = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def split_to(batches: list, count: int) -> list:
    """Split the micro-batches with the most rows in two until there are `count` (another rank needs that many)."""
    batches = [list(b) for b in batches]
    while len(batches) < count:
        largest = max(range(len(batches)), key=lambda k: len(batches[k]))
        if len(batches[largest]) < 2:
            raise ValueError(f"cannot make {count} micro-batches of {sum(map(len, batches))} rows")
        rows = batches.pop(largest)
        batches[largest:largest] = [rows[:len(rows) // 2], rows[len(rows) // 2:]]
    return batches


def padding_share(attention_masks: list) -> float:
    """Pad tokens / all tokens of the passes over these micro-batches (prompt and completion)."""
    return 1 - sum(m.sum().item() for m in attention_masks) / sum(m.numel() for m in attention_masks)


def encodings_per_image(batches: list, images: list, num_generations: int) -> float:
    """Images the vision tower encodes per pass over the micro-batches, per distinct image: 1.0 when each prompt's
    completions sit in one micro-batch (its images are encoded once there), more when a cut splits them."""
    encoded = sum(len({id(image) for j in batch for image in images[j // num_generations]}) for batch in batches)
    distinct = len({id(image) for row_images in images for image in row_images})
    return encoded / distinct if distinct else 1.0
