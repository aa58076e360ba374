import importlib.util
import json
import os

import pytest
import torch

from sophiavl.demo.build_tiny_assets import asset_paths, build, write_data
from sophiavl.demo.tiny_model import build_tiny_model
from sophiavl.utils import prompts
from sophiavl.utils.data import load_rows, open_images
from tests.helpers import in_process_vllm

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("tiny")), seed=0, num_train=50, num_test=10)


@pytest.fixture(scope="module")
def processor(assets):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(assets["model"])


@pytest.fixture(scope="module")
def model(assets):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(assets["model"], dtype=torch.float32).eval()


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_same_seed_gives_identical_rows_and_image_bytes(tmp_path):
    first, second, other = (asset_paths(str(tmp_path / name)) for name in ("a", "b", "c"))
    for paths, seed in ((first, 0), (second, 0), (other, 1)):
        os.makedirs(paths["data_dir"])
        write_data(paths, seed=seed, num_train=12, num_test=6)
    for key in ("train", "test", "registry"):
        assert open(first[key], "rb").read() == open(second[key], "rb").read()
    assert folder_bytes(first["images"]) == folder_bytes(second["images"])
    assert len(os.listdir(first["images"])) == 10 + 5  # every fifth row is text-only
    assert open(first["train"], "rb").read() != open(other["train"], "rb").read()
    assert folder_bytes(first["images"]) != folder_bytes(other["images"])


def test_rows_follow_the_sophiavl_format_and_cover_all_problem_types(assets):
    rows = json.load(open(assets["train"]))
    assert len(rows) == 50
    assert {row["problem_type"] for row in rows} == set(prompts.PROBLEM_TYPES)
    colour = rows[0]
    assert colour["problem_id"] == "train_00000" and colour["path"] == "train_00000.png"
    assert colour["options"] == ["A. red", "B. green", "C. blue", "D. yellow"]
    letter = colour["solution"][len("<answer>"):-len("</answer>")]
    colour_name = colour["options"]["ABCD".index(letter)][3:]
    assert colour["reasoning"] == [f"the shape is {colour_name}", f"{colour_name} is option {letter}"]
    for row in rows:
        assert row["solution"].startswith("<answer>") and row["solution"].endswith("</answer>")
        assert row["data_type"] == ("text" if row["problem_type"] == "text" else "image")
        assert (row["path"] == "") == (row["data_type"] == "text")
        assert row["reasoning"] and all(isinstance(step, str) for step in row["reasoning"])
    arithmetic = next(row for row in rows if row["problem_type"] == "text")
    a, b = (int(x) for x in arithmetic["problem"].removeprefix("What is ").removesuffix("?").split(" + "))
    assert arithmetic["solution"] == f"<answer>{a + b}</answer>"
    counting = next(row for row in rows if row["problem_type"] == "numerical")
    assert counting["reasoning"][-1].startswith(f"that makes {counting['solution'][8:-9]} square")


def test_registry_loads_through_utils_data(assets):
    rows = load_rows("tiny_train,tiny_test", assets["registry"])
    assert len(rows) == 60 and len({row["id"] for row in rows}) == 60
    image_row, text_row = rows[0], rows[4]
    assert [image.size for image in open_images(image_row)] == [(112, 112)]
    assert text_row["problem_type"] == "text" and text_row["images"] == []


def test_second_build_is_a_no_op(assets):
    config = os.path.join(assets["model"], "config.json")
    before = os.stat(config).st_mtime_ns
    assert build(assets["root"], seed=0, num_train=50, num_test=10) == assets
    assert os.stat(config).st_mtime_ns == before


def test_model_build_is_deterministic(tmp_path):
    corpus = ["What colour is the shape?", "the shape is red. red is option A"]
    for name in ("a", "b"):
        build_tiny_model(str(tmp_path / name), corpus, seed=3, fixed_texts=[prompts.QUESTION_TEMPLATE])
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_model_folder_is_under_10_mb(assets):
    size = sum(entry.stat().st_size for entry in os.scandir(assets["model"]))
    assert size < 10 * 1024 * 1024


def test_model_and_processor_load_with_the_auto_classes(model, processor):
    text = model.config.text_config
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert text.hidden_size // text.num_attention_heads == 32  # vLLM's CPU attention needs >= 32
    assert text.vocab_size == len(processor.tokenizer)
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert text.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(p.numel() for p in model.parameters()) < 2_500_000


def test_chat_template_is_qwens(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_greedy_generate_on_an_image_prompt(assets, model, processor):
    row = json.load(open(assets["test"]))[0]
    image = open_images(load_rows("tiny_test", assets["registry"])[0])[0]
    messages = prompts.policy_messages(row["problem"], row["problem_type"], row["options"], num_images=1)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert "mm_token_type_ids" in inputs  # mRoPE places the image tokens with it
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (inputs["input_ids"][0] == image_pad).sum().item() == 16  # 112x112, patch 14, merge 2
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    assert 1 <= len(new_tokens) <= 6
    again = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(output, again)


def test_think_and_answer_tags_are_single_plain_tokens(processor):
    tokenizer = processor.tokenizer
    response = "<think>the shape is red. red is option A</think><answer>A</answer>"
    ids = tokenizer(response + "<|im_end|>")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert all(tokens.count(tag) == 1 for tag in TAGS)
    assert tokens[-1] == "<|im_end|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == response  # im_end dropped, tags kept


def test_fixed_prompts_take_few_tokens_and_round_trip(processor):
    tokenizer = processor.tokenizer
    train_prompt = prompts.format_question("What colour is the shape?", "multiple choice",
                                           ["A. red", "B. green", "C. blue", "D. yellow"])
    trm_prompt = prompts.trm_messages("What colour is the shape?", "<think>the shape is red</think><answer>A</answer>",
                                      num_images=1)[1]["content"][1]["text"]
    for text, limit in ((train_prompt, 40), (trm_prompt, 40), (prompts.EVAL_SYSTEM_PROMPT, 20)):
        ids = tokenizer(text)["input_ids"]
        assert len(ids) <= limit
        assert tokenizer.decode(ids) == text
    assert len(train_prompt) > 600 and len(trm_prompt) > 1300


@pytest.mark.vllm
def test_vllm_loads_and_matches_hf_greedy(assets, model, processor):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    from vllm import LLM, SamplingParams

    with in_process_vllm():
        llm = LLM(model=assets["model"], dtype="float32", enforce_eager=True, max_model_len=2048,
                  limit_mm_per_prompt={"image": 2, "video": 0}, seed=0)
        rows = load_rows("tiny_test", assets["registry"])[:5]
        for row in rows:
            images = open_images(row)
            messages = prompts.policy_messages(row["prompt"], row["problem_type"], row["options"],
                                               num_images=len(images))
            output = llm.chat(prompts.to_openai_messages(messages, images),
                              SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)[0]
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            inputs = processor(text=[text], images=images or None, return_tensors="pt")
            hf_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
            assert list(output.prompt_token_ids) == inputs["input_ids"][0].tolist()
            assert list(output.outputs[0].token_ids) == hf_tokens.tolist()
