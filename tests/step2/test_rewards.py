"""Step-2 rewards: outcome per completion, thinking rewards through a real local TRM server, Trust-GRPO's sum."""
import math
import re
import time

import pytest
from PIL import Image

from step2_trust_grpo.arguments import VARIANTS
from step2_trust_grpo.rewards import final_rewards, outcome_rewards, thinking_rewards
from tests.fake_judge import HANG, FakeJudge, reply, request_images, request_text, status
from tests.helpers import closed_port
from sophiavl.utils.trm_client import TRMClient

pytestmark = pytest.mark.timeout(60)

N = 3
QUESTIONS = ["How many red squares?", "Compare the green and the blue image.", "What colour is this?"]
# distinct sizes as well as colours, so a swapped or dropped image cannot go unnoticed
IMAGES = [
    [Image.new("RGB", (8, 8), (255, 0, 0))],
    [Image.new("RGB", (6, 10), (0, 255, 0)), Image.new("RGB", (10, 6), (0, 0, 255))],
    [Image.new("RGB", (9, 7), (200, 200, 0))],
]
TEXTS = [f"<think>prompt {k} sample {j}</think><answer>A</answer>" for k in range(len(QUESTIONS)) for j in range(N)]


def response_in(body: dict) -> str:
    """The response a TRM request scores, cut out of the TRM prompt."""
    return re.search(r"Reasoning process: (.*)\n    Your response format", request_text(body), re.DOTALL).group(1)


def score_of(response: str) -> float:
    """The fake TRM's score: completion k gets (k + 1) / 10, so every index has its own value."""
    return (TEXTS.index(response) + 1) / 10


def scoring_judge(body, index):
    return reply(f"<answer>{score_of(response_in(body))}</answer>")


def client_for(url, **kwargs):
    kwargs = {"max_retries": 1, "backoff_s": 0.01, "timeout_s": 5, **kwargs}
    return TRMClient(url, "judge", **kwargs)


def pixels(image):
    return image.size, image.convert("RGB").tobytes()


def run(client, outcome, reference_parity=False):
    return thinking_rewards(client, QUESTIONS, TEXTS, IMAGES, outcome, N, reference_parity=reference_parity)


# --- thinking rewards against a live server ----------------------------------------------------------


def test_every_response_goes_with_all_of_its_own_prompts_images_and_its_score_lands_at_its_index():
    with FakeJudge(scoring_judge) as judge:
        thinking, stats = run(client_for(judge.url), [1.0, 0.0, 1.0] * 3)

    assert thinking == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert len(judge.requests) == 9
    assert sorted(response_in(body) for body in judge.requests) == sorted(TEXTS)
    for body in judge.requests:
        prompt = TEXTS.index(response_in(body)) // N
        assert [pixels(im) for im in request_images(body)] == [pixels(im) for im in IMAGES[prompt]]
        assert f"Question: <image> {QUESTIONS[prompt]}\n" in request_text(body)
    assert (stats.calls, stats.failures, stats.failed_groups, stats.skipped_groups) == (9, 0, 0, 0)
    assert len(stats.latencies) == 9 and stats.errors == []


def test_paper_mode_scores_every_response_even_in_uniform_groups():
    outcome = [1.0, 1.0, 1.0, 0.0, 1.0, 0.1, 0.0, 0.0, 0.0]
    with FakeJudge(scoring_judge) as judge:
        thinking, stats = run(client_for(judge.url), outcome)
    assert thinking == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert stats.calls == len(judge.requests) == 9 and stats.skipped_groups == 0


def test_reference_parity_skips_uniform_groups_and_clearly_wrong_responses_without_a_request():
    # group 0: all >= 0.9 (0.9 included) -> skipped; group 2: all <= 0.1 (0.1 included) -> skipped;
    # group 1: mixed, 0.15 < 0.2 gets 0 without a request, 0.2 itself is scored
    outcome = [0.9, 1.0, 0.9, 1.0, 0.15, 0.2, 0.1, 0.0, 0.1]
    with FakeJudge(scoring_judge) as judge:
        thinking, stats = run(client_for(judge.url), outcome, reference_parity=True)
    assert thinking == pytest.approx([0, 0, 0, 0.4, 0, 0.6, 0, 0, 0])
    assert sorted(response_in(body) for body in judge.requests) == [TEXTS[3], TEXTS[5]]
    assert (stats.calls, stats.skipped_groups, stats.failures, stats.failed_groups) == (2, 2, 0, 0)


def test_reference_parity_with_only_uniform_groups_sends_nothing():
    with FakeJudge(scoring_judge) as judge:
        thinking, stats = run(client_for(judge.url), [1.0] * 3 + [0.0] * 3 + [0.95, 0.9, 1.0], reference_parity=True)
    assert thinking == [0.0] * 9 and judge.requests == []
    assert stats.calls == 0 and stats.skipped_groups == 3


# --- failing servers: counted fallback, no hang ------------------------------------------------------


def assert_all_failed(thinking, stats, error_start):
    assert thinking == [0.0] * 9
    assert (stats.calls, stats.failures, stats.failed_groups) == (9, 9, 3)
    assert len(stats.errors) == 9 and all(error_start in e for e in stats.errors)


def test_a_server_answering_500_zeroes_every_group_and_counts_it():
    start = time.monotonic()
    with FakeJudge(lambda body, index: status(500)) as judge:
        thinking, stats = run(client_for(judge.url, max_retries=2), [1.0, 0.0, 1.0] * 3)
    assert_all_failed(thinking, stats, "HTTP 500")
    assert len(judge.requests) == 9 * 3  # first attempt + 2 retries each
    assert time.monotonic() - start < 20


def test_a_closed_port_zeroes_every_group_and_counts_it():
    start = time.monotonic()
    thinking, stats = run(client_for(f"http://127.0.0.1:{closed_port()}/v1"), [1.0, 0.0, 1.0] * 3)
    assert_all_failed(thinking, stats, "connection error")
    assert time.monotonic() - start < 20


def test_a_hanging_server_is_bounded_by_the_client_timeout():
    start = time.monotonic()
    with FakeJudge(lambda body, index: HANG) as judge:
        thinking, stats = run(client_for(judge.url, timeout_s=0.5, max_retries=0), [1.0, 0.0, 1.0] * 3)
        elapsed = time.monotonic() - start  # before the server's exit releases the hanging handlers
    assert_all_failed(thinking, stats, "timed out")
    assert elapsed < 10


def test_one_failed_response_zeroes_only_its_own_group():
    # only completion 4 (group 1) fails; its group-mates were scored by the server but are zeroed too
    def judge_failing_one(body, index):
        return status(500) if response_in(body) == TEXTS[4] else scoring_judge(body, index)

    with FakeJudge(judge_failing_one) as judge:
        thinking, stats = run(client_for(judge.url), [1.0, 0.0, 1.0] * 3)
    assert thinking == pytest.approx([0.1, 0.2, 0.3, 0, 0, 0, 0.7, 0.8, 0.9])
    assert (stats.calls, stats.failures, stats.failed_groups) == (9, 1, 1)
    assert len(judge.requests) == 9 + 1  # one retry of the failing request


def test_a_prompt_over_the_trm_image_cap_zeroes_its_group_without_a_request():
    # prompt 1 has two images; a server that takes one per request would answer each of its requests HTTP 400
    with FakeJudge(scoring_judge) as judge:
        thinking, stats = run(client_for(judge.url, max_images=1), [1.0, 0.0, 1.0] * 3)
    assert thinking == pytest.approx([0.1, 0.2, 0.3, 0, 0, 0, 0.7, 0.8, 0.9])
    assert (stats.calls, stats.failures, stats.failed_groups) == (9, 3, 1)
    assert stats.errors == ["not sent: 2 images, over the TRM server's cap of 1 per request "
                            "(serve it with --max-images 2 or more)"] * 3
    assert sorted(response_in(body) for body in judge.requests) == TEXTS[:3] + TEXTS[6:]


def test_an_unparsable_judge_answer_zeroes_its_group():
    def judge_babbling_once(body, index):
        return reply("no idea") if response_in(body) == TEXTS[8] else scoring_judge(body, index)

    with FakeJudge(judge_babbling_once) as judge:
        thinking, stats = run(client_for(judge.url), [1.0, 0.0, 1.0] * 3)
    assert thinking == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0, 0, 0])
    assert (stats.failures, stats.failed_groups) == (1, 1) and "no parsable score" in stats.errors[0]


# --- Trust-GRPO's final reward -----------------------------------------------------------------------

OUTCOME = [1.0, 1.0, 0.0, 0.0]
THINKING = [0.2, 0.4, 0.9, 0.7]  # mu_c = 0.3 < mu_w = 0.8: gamma = exp(-0.5) = 0.60653066
# alpha 0.3, step 1, horizon 10: annealing exp(-0.1) = 0.90483742
EXPECTED = {
    # weight 0.3 * exp(-0.5) * exp(-0.1) = 0.3 * exp(-0.6) = 0.16464349
    "full": ([1.03292870, 1.06585740, 0.14817914, 0.11525044], 0.60653066),
    # weight 0.3 * exp(-0.1) = 0.27145123
    "wo-trust": ([1.05429025, 1.10858049, 0.24430610, 0.19001586], 1.0),
    # weight 0.3
    "wo-trust-and-annealing": ([1.06, 1.12, 0.27, 0.21], 1.0),
    # no thinking reward: main.py passes R^t = 0, so R = R^o
    "grpo": ([1.0, 1.0, 0.0, 0.0], 1.0),
}


def test_every_variant_has_a_hand_computed_case():
    assert set(EXPECTED) == set(VARIANTS)


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_final_rewards_of_each_variant(variant):
    use_thinking, use_trust, use_anneal = VARIANTS[variant]
    thinking = THINKING if use_thinking else [0.0] * 4
    rewards, gammas = final_rewards(OUTCOME, thinking, 4, 1, alpha=0.3, horizon=10,
                                    use_trust=use_trust, use_anneal=use_anneal)
    expected_rewards, expected_gamma = EXPECTED[variant]
    assert rewards == pytest.approx(expected_rewards, abs=1e-7)
    assert gammas == pytest.approx([expected_gamma], abs=1e-7)


def test_final_rewards_give_one_gamma_per_group_in_order():
    # group 1 is distrusted as above; group 2 has mu_c = 0.7 >= mu_w = 0.2, so gamma = 1
    outcome = OUTCOME + [1.0, 0.0, 1.0, 0.0]
    thinking = THINKING + [0.8, 0.1, 0.6, 0.3]
    rewards, gammas = final_rewards(outcome, thinking, 4, 1, alpha=0.3, horizon=10, use_trust=True, use_anneal=True)
    assert gammas == pytest.approx([math.exp(-0.5), 1.0])
    # group 2 weight 0.3 * exp(-0.1) = 0.27145123
    assert rewards == pytest.approx(EXPECTED["full"][0] + [1.21716098, 0.02714512, 1.16287074, 0.08143537], abs=1e-7)


def test_annealing_follows_the_step():
    # full variant at step 10 of horizon 10: weight 0.3 * exp(-0.5) * exp(-1) = 0.06693905
    rewards, _ = final_rewards(OUTCOME, THINKING, 4, 10, alpha=0.3, horizon=10, use_trust=True, use_anneal=True)
    assert rewards == pytest.approx([1.01338781, 1.02677562, 0.06024514, 0.04685733], abs=1e-7)


# --- outcome rewards ---------------------------------------------------------------------------------


def test_outcome_rewards_map_completion_i_to_row_i_floordiv_n():
    rows = [{"answer": "A", "problem_type": "multiple choice"}, {"answer": "C", "problem_type": "multiple choice"}]
    answers = ["A", "C", "A", "C", "C", "A"]
    texts = [f"<think>hmm</think><answer>{a}</answer>" for a in answers]
    assert outcome_rewards(texts, rows, 3, 4096) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]


def test_outcome_rewards_honour_max_answer_chars():
    rows = [{"answer": "A", "problem_type": "multiple choice"}]
    assert outcome_rewards(["<think>hmm</think><answer>A</answer>"], rows, 1, 1) == [1.0]
    assert outcome_rewards(["<think>hmm</think><answer> A</answer>"], rows, 1, 1) == [0.0]


def test_outcome_rewards_use_the_reference_gate_unless_strict_format():
    rows = [{"answer": "A", "problem_type": "multiple choice"}]
    texts = ["<think>hmm</think><answer>A</answer>.", "<think>hmm</think> so <answer>A</answer>",
             "<think>hmm</think><answer>A</answer><answer>C</answer>",
             "<think>hmm</think><answer>C</answer><answer>A</answer>"]
    assert outcome_rewards(texts, rows, 4, 4096) == [1.0, 1.0, 1.0, 0.0]
    assert outcome_rewards(texts, rows, 4, 4096, strict_format=True) == [0.0, 0.0, 0.0, 1.0]
