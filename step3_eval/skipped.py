"""Rows step 3 cannot evaluate: prompts longer than --max-prompt-length and rows whose images fail to decode.

They are never dropped silently: each gets a line in predictions.jsonl with an empty prediction, score 0 (it counts
as a wrong answer in every mean, as a failed prediction does in VLMEvalKit, so scores stay over the whole benchmark)
and "skipped" giving the reason; summary.json lists them.
"""
import logging

from sophiavl.utils.cli import InputError

logger = logging.getLogger(__name__)


def default_max_prompt_length(args) -> int:
    """What the context leaves after --max-new-tokens: vllm's --max-model-len, else the model's
    max_position_embeddings (its text config's for a VLM)."""
    if args.backend == "vllm":
        context, source = args.max_model_len, "--max-model-len"
    else:
        from transformers import AutoConfig

        context = AutoConfig.from_pretrained(args.model_path).get_text_config().max_position_embeddings
        source = f"{args.model_path}'s max_position_embeddings"
    if context <= args.max_new_tokens:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in {source} {context}")
    return context - args.max_new_tokens


def over_long(rows: list, lengths: list, max_length: int, log: bool = True) -> dict:
    """{row index: reason} for the prompts over `max_length` tokens, reported in one warning line."""
    skipped = {i: f"prompt of {length} tokens > --max-prompt-length {max_length}"
               for i, length in enumerate(lengths) if length > max_length}
    if skipped and log:
        longest = max(skipped, key=lambda i: lengths[i])
        logger.warning("%d of %d prompts are longer than --max-prompt-length %d tokens and are skipped (scored 0, "
                       "listed in summary.json); the longest, row id %s of %s, has %d tokens", len(skipped),
                       len(rows), max_length, rows[longest]["id"], rows[longest]["dataset"], lengths[longest])
    return skipped


def skipped_prediction(index: int, row: dict, reason: str) -> dict:
    return {"index": index, "id": row["id"], "dataset": row["dataset"], "problem_type": row["problem_type"],
            "prompt": row["prompt"], "answer": row["answer"], "prediction": "", "extracted": None, "score": 0.0,
            "skipped": reason}


def skipped_summary(predictions: list) -> dict:
    skipped = [p for p in predictions if p.get("skipped")]
    return {"count": len(skipped), "note": "scored 0 and counted in every mean",
            "rows": [{"id": p["id"], "dataset": p["dataset"], "reason": p["skipped"]} for p in skipped]}
