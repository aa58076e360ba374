"""Token-budget micro-batches (--max-tokens-per-micro-batch): how rows are packed, what a row's length is, the flag's
rule, and a 2-rank ZeRO-3 update whose gradient equals the fixed-count path's under the step-global token mean
while the ranks plan different numbers of micro-batches."""
import pytest
import torch

from sophiavl.utils.cli import InputError
from step2_trust_grpo.arguments import check_args, parse_args
from step2_trust_grpo.micro_batches import (encodings_per_image, fixed_count, padding_share, sequence_lengths,
                                           split_to, token_budget)
from tests.helpers import run_on_ranks


def test_rows_go_longest_first_while_rows_times_the_longest_fit_the_budget():
    # 50, 50 fill 100; then 20 opens a batch that takes 10 and 5 (3 x 20 = 60)
    assert token_budget([10, 50, 20, 50, 5], 100) == [[1, 3], [2, 0, 4]]
    assert token_budget([300, 10], 100) == [[0], [1]]  # a row over the budget goes alone
    assert fixed_count(5, 2) == [[0, 1], [2, 3], [4]]


def test_the_largest_micro_batches_are_split_until_the_count_other_ranks_need():
    assert split_to([[1, 3], [2, 0, 4]], 3) == [[1, 3], [2], [0, 4]]
    assert split_to([[1, 3], [2, 0, 4]], 2) == [[1, 3], [2, 0, 4]]
    assert sorted(i for b in split_to([[0, 1, 2, 3]], 4) for i in b) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot make 3 micro-batches of 2 rows"):
        split_to([[0], [1]], 3)


def test_padding_share_and_image_encodings_of_a_cut():
    masks = [torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.tensor([[1, 1, 0]])]  # 2 pads of 11 tokens
    assert padding_share(masks) == pytest.approx(2 / 11)
    a, b, c = object(), object(), object()
    images = [[a], [b, c], []]  # 3 prompts, 2 completions each (rows 0-5); the last prompt is text only
    assert encodings_per_image([[0, 1], [2, 3], [4, 5]], images, 2) == 1.0
    assert encodings_per_image([[0, 2], [1, 3, 4], [5]], images, 2) == 2.0  # a, b, c each in two micro-batches
    assert encodings_per_image([[4, 5]], [[], [], []], 2) == 1.0  # no images: nothing encoded again


def prompts_and_completions(tiny_assets, count=3):
    from sophiavl.utils.data import load_rows, open_images
    from sophiavl.utils.model import load_processor
    from sophiavl.utils.prompts import policy_messages
    from sophiavl.utils.vision import resize_images

    processor = load_processor(tiny_assets["model"])
    rows = [r for r in load_rows("tiny_test", tiny_assets["registry"]) if r["images"]][:count]
    images = [resize_images(open_images(r), processor) for r in rows]
    chats = [policy_messages(r["prompt"], r["problem_type"], r["options"], len(i)) for r, i in zip(rows, images)]
    return processor, chats, images


def test_a_row_s_length_is_its_unpadded_length_in_the_training_batch(tiny_assets):
    from sophiavl.utils.model import chat_texts
    from sophiavl.utils.prompts import POLICY_THINKING
    from step2_trust_grpo.policy import completion_batch

    processor, chats, images = prompts_and_completions(tiny_assets)
    completion_ids = [processor.tokenizer.encode("<think>" + "ok " * k + "</think><answer>A</answer>")
                      for k in (1, 9, 4, 2, 7, 3)]  # 2 per prompt
    lengths = sequence_lengths(processor, chat_texts(processor, chats, enable_thinking=POLICY_THINKING), images,
                               completion_ids, 2)
    for j, ids in enumerate(completion_ids):
        batch = completion_batch(processor, [chats[j // 2]], [images[j // 2]], [ids])
        assert lengths[j] == int(batch["attention_mask"].sum()) > len(ids) + 16  # 16 image tokens at least


def step2_args(*extra):
    return parse_args(["--model-path", "m", "--registry", "r", "--data-path", "d", "--output-dir", "o",
                       "--variant", "grpo", *extra])


def test_a_token_budget_needs_a_step_global_loss_aggregation():
    with pytest.raises(InputError, match="changes the per-micro-batch mean of --loss-agg token-mean"):
        check_args(step2_args("--max-tokens-per-micro-batch", "512"), world_size=1)
    check_args(step2_args("--max-tokens-per-micro-batch", "512", "--loss-agg", "token-mean-global"), world_size=1)
    with pytest.raises(InputError, match="must be >= 0"):
        check_args(step2_args("--max-tokens-per-micro-batch", "-1"), world_size=1)


def update_deltas(rank, tiny_assets):
    """Two update_policy steps from the same weights and rollouts, with fixed micro-batches of 2, and with token
    budgets: one micro-batch per rank in the first step, then 3 in the second (rank 0's long completions need 3, so
    rank 1 splits one of its 2). Plain SGD with lr 1, so the second step's weight change is the gradient DeepSpeed
    applied; it must not depend on how the step was cut, nor on the previous step's count. Asserts on rank 0."""
    import types

    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from sophiavl.utils.distributed import init_distributed, shutdown
    from sophiavl.utils.ds_config import zero3_train_config
    from sophiavl.utils.model import load_model
    from step2_trust_grpo.main import update_policy

    init_distributed()
    torch.manual_seed(0)
    processor, chats, images = prompts_and_completions(tiny_assets, count=2)
    words = (1, 30, 2, 25) if rank == 0 else (1, 2, 3, 2)  # 2 prompts x N 2 per rank
    completions = types.SimpleNamespace(rollout_logps=None, token_ids=[
        processor.tokenizer.encode("<think>" + "ok " * k + "</think><answer>A</answer>") for k in words])
    rewards = [1.0, 0.0, 0.3, 0.9] if rank == 0 else [0.2, 0.8, 1.0, 0.0]
    planned = {}

    def second_step_deltas(name, first_flags, second_flags):
        common = ("--num-generations", "2", "--micro-batch-size", "2", "--loss-agg", "token-mean-global",
                  "--kl-coef", "0", "--entropy-coef", "0", "--max-completion-length", "64")
        config = zero3_train_config(micro_batch_size=2, gradient_accumulation_steps=2, world_size=2, bf16=False,
                                    gradient_clipping=0.0, param_persistence_threshold=0)
        hf_ds_config = HfDeepSpeedConfig(config)
        model = load_model(tiny_assets["model"], torch.float32, hf_ds_config=hf_ds_config)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                          config=config)
        update_policy(engine, None, processor, chats, images, completions, lambda: rewards,
                      step2_args(*common, *first_flags))
        planned[name] = [engine.gradient_accumulation_steps()]
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            before = [p.detach().clone() for p in engine.module.parameters()]
        update_policy(engine, None, processor, chats, images, completions, lambda: rewards,
                      step2_args(*common, *second_flags))
        planned[name].append(engine.gradient_accumulation_steps())
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return [b - p.detach() for b, p in zip(before, engine.module.parameters())]

    fixed = second_step_deltas("fixed", (), ())
    budgeted = second_step_deltas("budget", ("--max-tokens-per-micro-batch", "10000"),
                                  ("--max-tokens-per-micro-batch", "200"))
    if rank == 0:
        assert planned == {"fixed": [2, 2], "budget": [1, 3]}, planned
        assert any(d.abs().max() > 1e-4 for d in fixed), "the update moved nothing: the check proves nothing"
        for a, b in zip(fixed, budgeted):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    shutdown()


@pytest.mark.slow
def test_token_budget_micro_batches_give_the_fixed_count_gradient_under_the_global_token_mean(tiny_assets):
    run_on_ranks(update_deltas, tiny_assets, timeout=400)
