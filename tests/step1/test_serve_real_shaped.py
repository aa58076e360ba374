"""The served judge sees what step 1 trained it on, on a judge laid out like Qwen2.5-VL-3B-Instruct (tied head,
the release's generation_config.json with repetition_penalty 1.05 and preprocessor_config.json with max_pixels
12,845,056): the pixel limits step 1 trained with travel in the saved processor config and `vllm serve` builds the
same image grid from them, and the served judge decodes with no penalty, as transformers does in training and
evaluation (the TRM client pins every sampling field, the server runs with --generation-config vllm)."""
import dataclasses
import importlib.util
import json
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from sophiavl.utils import vllm_server
from tests.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(600),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]

MIN_PIXELS, MAX_PIXELS = 16 * 28 * 28, 100 * 28 * 28  # step 1's --min-pixels / --max-pixels
# A random tied judge echoes its last input token so strongly that the release's 1.05 leaves its greedy reply as
# it is; its generation_config.json here asks for 1.3, which changes it, so that a leak of the default shows.
CHECKPOINT_PENALTY = 1.3


@pytest.fixture(scope="module")
def trained_judge(real_shaped_judge, tmp_path_factory):
    """The judge folder as step 1 leaves it: weights and the processor it trained with (utils.zero3.save_hf_model
    saves both with save_pretrained)."""
    from sophiavl.utils.model import load_model, load_processor

    folder = str(tmp_path_factory.mktemp("trm") / "final")
    model = load_model(real_shaped_judge, torch.float32)
    model.generation_config.repetition_penalty = CHECKPOINT_PENALTY
    model.save_pretrained(folder)
    load_processor(real_shaped_judge, MIN_PIXELS, MAX_PIXELS).save_pretrained(folder)
    return folder


def test_served_judge_uses_the_training_pixel_limits_and_no_checkpoint_sampling_defaults(trained_judge, tmp_path):
    from transformers import AutoProcessor

    from sophiavl.utils.generation import Sampling, hf_generate
    from sophiavl.utils.model import chat_inputs, load_model
    from sophiavl.utils.prompts import to_openai_messages, trm_messages
    from sophiavl.utils.trm_client import TRMClient
    from sophiavl.utils.vision import pixel_limits

    processor = AutoProcessor.from_pretrained(trained_judge)
    assert pixel_limits(processor) == (MIN_PIXELS, MAX_PIXELS)  # saved with the judge, not the release's
    processor.tokenizer.padding_side = "left"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (960, 1280, 3), dtype=np.uint8))
    question, response = "How many squares are there?", "<think>I count three squares.</think><answer>3</answer>"
    messages = trm_messages(question, response, 1)
    trained_tokens = chat_inputs(processor, [messages], [[image]])["input_ids"].shape[1]
    model = load_model(trained_judge, torch.float32).eval()
    greedy = Sampling(max_new_tokens=16)
    expected, _ = hf_generate(model, processor, [messages], [[image]], greedy)
    assert model.generation_config.repetition_penalty == CHECKPOINT_PENALTY
    penalised, _ = hf_generate(model, processor, [messages], [[image]],
                               dataclasses.replace(greedy, repetition_penalty=CHECKPOINT_PENALTY))
    assert penalised != expected  # the check has power: the checkpoint's penalty would change the judge's reply

    port = free_port()
    server = vllm_server.start_server(trained_judge, port, log_path=str(tmp_path / "vllm.log"), max_model_len=2048,
                                max_images=1)
    try:
        try:
            vllm_server.wait_ready(f"http://127.0.0.1:{port}/v1", timeout=400, proc=server)
        except (RuntimeError, TimeoutError):
            pytest.fail("server not ready:\n" + (tmp_path / "vllm.log").read_text()[-3000:])
        request = {"model": vllm_server.SERVED_MODEL_NAME, "max_tokens": 1, "temperature": 0,
                   "messages": to_openai_messages(messages, [image])}
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(request).encode(),
                {"Content-Type": "application/json"}), timeout=120) as reply:
            served_tokens = json.load(reply)["usage"]["prompt_tokens"]
        assert served_tokens == trained_tokens  # the same image grid as in training, from the saved limits
        client = TRMClient(f"http://127.0.0.1:{port}/v1", vllm_server.SERVED_MODEL_NAME, timeout_s=120)
        [result] = client.score_many_sync([(question, response, [image])])
        assert result.text == expected[0]
    finally:
        vllm_server.stop(server)
