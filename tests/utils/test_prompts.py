import base64
import io

import pytest
from PIL import Image

from sophiavl.utils.cli import InputError
from sophiavl.utils.prompts import (EVAL_SYSTEM_PROMPT, PROBLEM_TYPES, TRM_SYSTEM_PROMPT, TYPE_TEMPLATE,
                                    format_question, policy_messages, to_openai_messages, trm_messages)

# Written out again here (from the reference's prompts, docs/method.md section 9) so a stray edit of the module's constants fails a test.
BODY = (
    "Please think about this question as if you were a human pondering deeply. Engage in an internal dialogue "
    "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other "
    "natural language thought expressions It's encouraged to include self-reflection or verification in the "
    "reasoning process. Provide your detailed reasoning between the <think> </think> tags, and then give your "
    "final answer between the <answer> </answer> tags."
)
SUFFIXES = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "text": " Please provide the short text answer within the <answer> </answer> tags.",
}
TRM_HEAD = (
    "You are an expert reasoning evaluator. I will give you a multimodal question and an answer. Your goal is to "
    "judge a reward process and give a score between 0 and 1. You should focus on whether the reasoning process is "
    "good rather than whether the final answer is correct.### Evaluation Criteria:\n- **Logical Soundness**: "
)
TRM_MIDDLE = (
    "Provide a single score from **{0, 0.1, 0.2, ..., 1.0}** based on the reasoning quality, where:\n"
    " - **0**: Completely flawed reasoning\n- **1**: Perfectly sound reasoning\n"
)


@pytest.mark.parametrize("problem_type", PROBLEM_TYPES)
def test_format_question_is_problem_template_and_suffix(problem_type):
    assert format_question("What is 2+3?", problem_type) == "What is 2+3?\n" + BODY + SUFFIXES[problem_type]


def test_type_templates_cover_exactly_the_problem_types():
    assert set(TYPE_TEMPLATE) == set(PROBLEM_TYPES) == set(SUFFIXES)


def test_multiple_choice_options_are_joined_with_semicolons_right_after_the_problem():
    text = format_question("What colour is the square?", "multiple choice", ["A. red", "B. blue", "C. green"])
    assert text == "What colour is the square?A. red; B. blue; C. green\n" + BODY + SUFFIXES["multiple choice"]


def test_options_are_ignored_for_other_problem_types():
    assert format_question("Q", "numerical", ["A. 1"]) == "Q\n" + BODY + SUFFIXES["numerical"]


def test_braces_in_the_problem_are_kept_literally():
    assert format_question("Solve {x} in {Question}", "numerical").startswith("Solve {x} in {Question}\nPlease")


def test_unknown_problem_type_is_an_input_error():
    with pytest.raises(InputError, match="problem_type 'essay'"):
        format_question("Q", "essay")


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_policy_messages_train_template(num_images):
    messages = policy_messages("Q", "numerical", num_images=num_images)
    assert messages == [{"role": "user", "content": [{"type": "image"}] * num_images
                         + [{"type": "text", "text": "Q\n" + BODY + SUFFIXES["numerical"]}]}]


def test_policy_messages_train_with_a_system_prompt():
    messages = policy_messages("Q", "text", system_prompt="Be brief.")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["role"] == "user"


def test_policy_messages_eval_template_uses_vlmevalkit_options_and_the_eval_system_prompt():
    messages = policy_messages("Which is blue?", "multiple choice", options=["A. sky", "(B) grass", "sun"],
                               num_images=1, template="eval")
    assert messages[0] == {"role": "system", "content": EVAL_SYSTEM_PROMPT}
    assert messages[1]["content"][0] == {"type": "image"}
    assert messages[1]["content"][1]["text"] == (
        "Question: Which is blue?\nOptions:\nA. sky\nB. grass\nC. sun\n"
        "Please select the correct answer from the options above.")


def test_eval_template_without_options_is_the_bare_problem():
    messages = policy_messages("What is 2+3?", "numerical", template="eval")
    assert messages[1]["content"] == [{"type": "text", "text": "What is 2+3?"}]


def test_eval_system_prompt_is_verbatim():
    assert EVAL_SYSTEM_PROMPT.startswith("You FIRST think about the reasoning process as an internal monologue")
    assert "verification in the reasoning process.The reasoning process MUST BE enclosed" in EVAL_SYSTEM_PROMPT
    assert EVAL_SYSTEM_PROMPT.endswith("If you use formula, please use LaTeX format.")


def test_unknown_template_is_an_input_error():
    with pytest.raises(InputError, match="template"):
        policy_messages("Q", "text", template="chat")


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_trm_messages_structure(num_images):
    messages = trm_messages("How many apples?", "<think>two</think><answer>2</answer>", num_images)
    assert messages[0] == {"role": "system", "content": TRM_SYSTEM_PROMPT}
    assert TRM_SYSTEM_PROMPT == "You are a helpful assistant."
    content = messages[1]["content"]
    assert messages[1]["role"] == "user" and len(messages) == 2
    assert content[:-1] == [{"type": "image"}] * num_images
    text = content[-1]["text"]
    prefix = "<image> " if num_images else ""
    assert text.startswith(TRM_HEAD)
    assert TRM_MIDDLE in text
    assert text.endswith(
        "You should only output the score without any explanation.\n"
        f"    Question: {prefix}How many apples?\n"
        "    Reasoning process: <think>two</think><answer>2</answer>\n"
        "    Your response format: <answer>your_score</answer>")


def test_trm_placeholders_in_the_inputs_are_not_substituted_again():
    text = trm_messages("Q {response}", "R {question}", 0)[1]["content"][-1]["text"]
    assert "    Question: Q {response}\n    Reasoning process: R {question}\n" in text


def test_trm_question_with_its_own_image_marker_is_not_prefixed_twice():
    text = trm_messages("<image>\nWhat is shown?", "r", 1)[1]["content"][-1]["text"]
    assert "    Question: <image>\nWhat is shown?\n" in text


def _decode(url):
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_to_openai_messages_round_trips_pixels_in_order():
    red = Image.new("RGB", (5, 3), (255, 0, 0))
    mixed = Image.new("RGB", (4, 4), (0, 0, 255))
    mixed.putpixel((1, 2), (10, 20, 30))
    messages = trm_messages("Q", "R", 2)
    converted = to_openai_messages(messages, [red, mixed])
    parts = converted[1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    for part, original in zip(parts, [red, mixed]):
        decoded = _decode(part["image_url"]["url"]).convert("RGB")
        assert decoded.size == original.size
        assert list(decoded.getdata()) == list(original.getdata())
    assert parts[2] == messages[1]["content"][2]
    assert converted[0] == messages[0]
    assert messages[1]["content"][0] == {"type": "image"}, "the input messages must not be modified"


def test_to_openai_messages_needs_one_image_per_placeholder():
    with pytest.raises(InputError, match="2 image placeholders but 1 images"):
        to_openai_messages(trm_messages("Q", "R", 2), [Image.new("RGB", (2, 2))])


# --- <image> placeholders (EasyR1-style rows) ------------------------------------------------------------------

def test_policy_messages_put_each_image_where_its_placeholder_stands():
    messages = policy_messages("Left: <image>, right: <image>. Which is red?", "text", num_images=2)
    assert messages[0]["content"] == [
        {"type": "text", "text": "Left: "}, {"type": "image"}, {"type": "text", "text": ", right: "}, {"type": "image"},
        {"type": "text", "text": ". Which is red?\n" + BODY + SUFFIXES["text"]}]
    # a leading or doubled placeholder leaves no empty text part; the eval template places them too
    assert policy_messages("<image><image>\nQ", "numerical", num_images=2)[0]["content"] == [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "\nQ\n" + BODY + SUFFIXES["numerical"]}]
    assert policy_messages("In <image>, what?", "numerical", num_images=1, template="eval")[1]["content"] == [
        {"type": "text", "text": "In "}, {"type": "image"}, {"type": "text", "text": ", what?"}]


def test_policy_messages_with_more_or_fewer_placeholders_than_images_is_an_input_error():
    with pytest.raises(InputError, match=r"holds 2 <image> placeholder\(s\) but the row has 1 image\(s\)"):
        policy_messages("<image> or <image>?", "text", num_images=1)
    with pytest.raises(InputError, match=r"holds 1 <image> placeholder\(s\) but the row has 3 image\(s\)"):
        policy_messages("<image>?", "text", num_images=3)


def test_the_chat_template_puts_the_vision_tokens_at_the_placeholders(tiny_assets):
    """What both engines tokenize (processor.apply_chat_template): each image's vision tokens where its <image>
    stood: the first image (square, 8x8 patches) first, the second (tall, 12x6 once the processor's pixel bounds
    resize it) second."""
    from sophiavl.utils.model import chat_inputs, load_processor

    processor = load_processor(tiny_assets["model"])
    images = [Image.new("RGB", (112, 112), (255, 0, 0)), Image.new("RGB", (56, 112), (0, 0, 255))]
    messages = policy_messages("Left: <image>, right: <image>. Which is red?", "text", num_images=2)
    inputs = chat_inputs(processor, [messages], [images])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 12, 6]]
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    pads = lambda count: "<|vision_start|>" + "<|image_pad|>" * count + "<|vision_end|>"  # noqa: E731
    assert f"<|im_start|>user\nLeft: {pads(16)}, right: {pads(18)}. Which is red?\n" in text
    assert "<image>" not in text
