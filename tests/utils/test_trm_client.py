"""TRMClient against a real local HTTP server whose faults each test controls."""
import asyncio
import logging
import re

import pytest
from PIL import Image

from tests.fake_judge import (DROP, HANG, INVALID_JSON, NO_CHOICES, FakeJudge, fail_first, fixed_score, reply,
                              request_images, request_text, status)
from tests.helpers import closed_port
from sophiavl.utils.cli import InputError
from sophiavl.utils.trm_client import TRMClient, normalize_base_url

pytestmark = pytest.mark.timeout(60)


def client_for(judge, **kwargs):
    kwargs = {"max_retries": 3, "backoff_s": 0.01, "timeout_s": 5, **kwargs}
    return TRMClient(judge.url, "judge", **kwargs)


def score_one(client, question="What is 2+3?", response="<think>2+3=5</think><answer>5</answer>", images=()):
    return client.score_many_sync([(question, response, list(images))])[0]


def test_scores_a_request_and_sends_the_trm_chat(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeJudge(fixed_score(0.7)) as judge:
        result = score_one(client_for(judge), images=[Image.new("RGB", (8, 8), "red")])
    assert result.score == pytest.approx(0.7)
    assert result.text == "<answer>0.7</answer>" and result.error is None and result.attempts == 1
    body = judge.requests[0]
    assert body["model"] == "judge" and body["temperature"] == 0.0 and body["max_tokens"] == 16
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert "Question: <image> What is 2+3?" in request_text(body)
    assert "Reasoning process: <think>2+3=5</think><answer>5</answer>" in request_text(body)
    assert judge.headers[0]["authorization"] == "Bearer EMPTY"


def test_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    with FakeJudge(fixed_score(0.5)) as judge:
        score_one(client_for(judge))
    assert judge.headers[0]["authorization"] == "Bearer sk-test-secret"


def test_refused_connection_is_retried_then_fails():
    client = TRMClient(f"http://127.0.0.1:{closed_port()}/v1", "judge", max_retries=2, backoff_s=0.01, timeout_s=5)
    result = score_one(client)
    assert result.score is None and result.attempts == 3
    assert result.error.startswith("gave up after 3 attempts: connection error")


def test_hanging_server_times_out_within_the_bound():
    with FakeJudge(lambda body, index: HANG) as judge:
        result = score_one(client_for(judge, timeout_s=0.5, max_retries=1))
    assert result.score is None and result.attempts == 2
    assert "timed out after 0.5s" in result.error
    assert len(judge.requests) == 2
    assert result.latency_s < 5


def test_answer_after_the_timeout_counts_as_a_timeout():
    with FakeJudge(fixed_score(0.9), delay_s=1.0) as judge:
        result = score_one(client_for(judge, timeout_s=0.3, max_retries=0))
    assert result.score is None and "timed out" in result.error and result.attempts == 1


@pytest.mark.parametrize("failure", [status(500), status(503), status(429), INVALID_JSON, NO_CHOICES, DROP],
                         ids=["500", "503", "429", "invalid-json", "no-choices", "dropped-connection"])
def test_transient_faults_are_retried_until_success(failure):
    with FakeJudge(fail_first(2, failure, fixed_score(0.3))) as judge:
        result = score_one(client_for(judge))
    assert result.score == pytest.approx(0.3) and result.error is None
    assert result.attempts == 3 and len(judge.requests) == 3


@pytest.mark.parametrize("failure", [status(500), status(429), INVALID_JSON, DROP], ids=["500", "429", "json", "drop"])
def test_persistent_transient_faults_give_up_after_max_retries(failure):
    with FakeJudge(lambda body, index: failure) as judge:
        result = score_one(client_for(judge, max_retries=2))
    assert result.score is None and result.attempts == 3 and len(judge.requests) == 3
    assert result.error.startswith("gave up after 3 attempts")


def test_server_restart_mid_run_is_survived():
    port = closed_port()

    async def run():
        client = TRMClient(f"http://127.0.0.1:{port}/v1", "judge", max_retries=4, backoff_s=0.2, timeout_s=5)
        with FakeJudge(fixed_score(0.2), port=port):
            first = await client.score("q", "r", [])
        # Down now; back after 0.5 s, while the client is between retries (0.2 + 0.4 + 0.8 s).
        restarted = FakeJudge(fixed_score(0.8), port=port)
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, restarted.__enter__)
        try:
            second = await client.score("q", "r", [])
        finally:
            await client.aclose()
            restarted.__exit__(None, None, None)
        return first, second, restarted

    first, second, restarted = asyncio.run(run())
    assert first.score == pytest.approx(0.2) and first.attempts == 1
    assert second.score == pytest.approx(0.8) and second.attempts in (3, 4)
    assert len(restarted.requests) == 1


def test_bad_request_is_not_retried():
    with FakeJudge(lambda body, index: status(400)) as judge:
        result = score_one(client_for(judge))
    assert result.score is None and result.attempts == 1 and len(judge.requests) == 1
    assert result.error.startswith("HTTP 400 (not retried)")


def test_completion_without_a_score_is_not_retried():
    with FakeJudge(lambda body, index: reply("The reasoning is sound.")) as judge:
        result = score_one(client_for(judge))
    assert result.score is None and result.attempts == 1 and len(judge.requests) == 1
    assert result.text == "The reasoning is sound."
    assert result.error.startswith("no parsable score")


def test_out_of_range_score_is_clamped():
    with FakeJudge(lambda body, index: reply("<answer>7</answer>")) as judge:
        assert score_one(client_for(judge)).score == 1.0


def test_backoff_doubles_between_attempts():
    with FakeJudge(lambda body, index: status(503)) as judge:
        result = score_one(client_for(judge, max_retries=2, backoff_s=0.2))
    assert 0.6 <= result.latency_s < 3  # sleeps of 0.2 then 0.4


def test_concurrency_bound_is_respected():
    items = [(f"q{i}", f"<answer>{i}</answer>", []) for i in range(12)]
    with FakeJudge(fixed_score(0.5), delay_s=0.2) as judge:
        results = client_for(judge, max_concurrency=3).score_many_sync(items)
    assert [r.score for r in results] == [0.5] * 12
    assert judge.max_in_flight == 3


def item_number(body):
    return int(re.search(r"question (\d)", request_text(body)).group(1))


def test_each_item_gets_its_own_images_in_order_and_results_keep_item_order():
    colours = {0: ["red", "green", "blue"], 1: ["yellow"], 2: [], 3: ["white", "black"]}
    items = [(f"question {i}", f"response {i}", [Image.new("RGB", (16, 16), c) for c in cs])
             for i, cs in colours.items()]

    def respond(body, index):  # the score echoes the item number: a result given to the wrong item would show
        return reply(f"<answer>0.{item_number(body)}</answer>")

    with FakeJudge(respond, delay_s=0.05) as judge:
        results = client_for(judge, max_concurrency=4).score_many_sync(items)
    assert [r.score for r in results] == [0.0, 0.1, 0.2, 0.3]
    assert len(judge.requests) == 4
    for body in judge.requests:
        item = item_number(body)
        received = [image.getpixel((0, 0)) for image in request_images(body)]
        assert received == [Image.new("RGB", (1, 1), c).getpixel((0, 0)) for c in colours[item]]
        assert ("<image> question" in request_text(body)) == bool(colours[item])


def test_client_is_reusable_across_event_loops():
    with FakeJudge(fixed_score(0.4)) as judge:
        client = client_for(judge)
        assert score_one(client).score == pytest.approx(0.4)
        assert score_one(client).score == pytest.approx(0.4)

        async def inside_a_loop():
            try:
                return await client.score("q", "r", [])
            finally:
                await client.aclose()

        assert asyncio.run(inside_a_loop()).score == pytest.approx(0.4)


def test_api_key_is_never_logged(monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-log-me")
    caplog.set_level(logging.DEBUG)
    with FakeJudge(fail_first(1, status(500), lambda body, index: status(401))) as judge:
        result = score_one(client_for(judge))
    assert result.score is None and result.attempts == 2
    assert "sk-never-log-me" not in caplog.text and "sk-never-log-me" not in result.error


@pytest.mark.parametrize("url, expected", [
    ("http://h:8000/v1", "http://h:8000/v1"),
    ("http://h:8000/v1/", "http://h:8000/v1"),
    ("http://h:8000/v1/chat/completions", "http://h:8000/v1"),
    ("https://api.example.com/openai/v1/chat/completions/", "https://api.example.com/openai/v1"),
    ("http://h:8000", "http://h:8000/v1"),
])
def test_url_normalisation(url, expected):
    assert normalize_base_url(url) == expected


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://h/v1", "http:///v1", "http://h/v1?key=1", ""])
def test_bad_urls_are_input_errors(url):
    with pytest.raises(InputError):
        normalize_base_url(url)


def test_full_chat_completions_url_reaches_the_server():
    with FakeJudge(fixed_score(0.6)) as judge:
        client = TRMClient(judge.url + "/chat/completions", "judge", timeout_s=5)
        assert score_one(client).score == pytest.approx(0.6)


def test_score_many_encodes_each_shared_image_once_and_sends_it_with_every_item(monkeypatch):
    import sophiavl.utils.trm_client as trm_client

    encoded, real = [], trm_client.image_to_data_url
    monkeypatch.setattr(trm_client, "image_to_data_url", lambda image: encoded.append(image) or real(image))
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    items = [("Q", f"R{i}", [red if i < 4 else blue]) for i in range(8)]
    with FakeJudge(fixed_score(0.7)) as judge:
        results = TRMClient(judge.url, "judge", max_concurrency=3).score_many_sync(items)
    assert [r.score for r in results] == [0.7] * 8 and len(encoded) == 2
    colours = [request_images(body)[0].getpixel((0, 0)) for body in judge.requests]
    assert sorted(colours) == [(0, 0, 255)] * 4 + [(255, 0, 0)] * 4


def test_a_request_over_the_servers_image_cap_is_refused_unsent_and_logged_once(caplog):
    def vllm_like(body, index):  # what vLLM answers a request over its --limit-mm-per-prompt
        return status(400) if len(request_images(body)) > 2 else reply("<answer>0.5</answer>")

    image = Image.new("RGB", (8, 8), "red")
    items = [(f"question {i}", "response", [image] * count) for i, count in enumerate([1, 3, 2, 4])]
    with FakeJudge(vllm_like) as judge, caplog.at_level(logging.WARNING, logger="utils.trm_client"):
        results = client_for(judge, max_images=2).score_many_sync(items)
    assert [(r.score, r.attempts) for r in results] == [(0.5, 1), (None, 0), (0.5, 1), (None, 0)]
    assert results[1].error == ("not sent: 3 images, over the TRM server's cap of 2 per request "
                                "(serve it with --max-images 3 or more)")
    assert sorted(len(request_images(body)) for body in judge.requests) == [1, 2]  # the refused two never left
    refusals = [record.getMessage() for record in caplog.records if "not sent" in record.getMessage()]
    assert refusals == ["TRM request " + results[1].error + "; later ones over the cap are refused without a log "
                        "line (each counts as a TRM failure)"]
    # without the cap, the request goes out and gets vLLM's 400, which is not retried
    with FakeJudge(vllm_like) as judge:
        result = score_one(client_for(judge), images=[image] * 3)
    assert result.score is None and result.error.startswith("HTTP 400 (not retried)") and len(judge.requests) == 1
    with pytest.raises(InputError, match="max_images >= 0"):
        client_for(judge, max_images=-1)
