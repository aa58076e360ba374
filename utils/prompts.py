"""The prompts every stage shares, verbatim from the reference (docs/method.md), and the chat messages built from them.

Messages are HF-style chat dicts with content parts ({"type": "image"} placeholders and one text part), the
form processors' `apply_chat_template` and vLLM's `llm.chat` accept; `to_openai_messages` turns the image
placeholders into base64 data URLs for an OpenAI-compatible server.
"""
import base64
import io
import re

from sophiavl.utils.cli import InputError

PROBLEM_TYPES = ("numerical", "multiple choice", "OCR", "free-form", "text")

# The chat template's thinking switch (Qwen3.5's enable_thinking), set by every stage, never left to a template's
# default: the policy reasons inside <think> before it answers (the format R^o checks); the judge must give its
# score within a few tokens. Templates without the switch ignore the variable.
POLICY_THINKING = True
JUDGE_THINKING = False

# The missing period after "thought expressions" is the reference's; the released checkpoints saw it.
QUESTION_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, "
    "and then give your final answer between the <answer> </answer> tags."
)

TYPE_TEMPLATE = {
    "multiple choice": " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    "numerical": " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    "OCR": " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> tags.",
    "free-form": " Please provide your text answer within the <answer> </answer> tags.",
    "text": " Please provide the short text answer within the <answer> </answer> tags.",
}

# Odd spacing ("correct.### Evaluation", " - **0**", the indented last lines) is the reference's, kept byte-exact.
# The literal braces in "{0, 0.1, ...}" are why this is filled by `_fill`, never by str.format.
TRM_PROMPT = (
    "You are an expert reasoning evaluator. I will give you a multimodal question and an answer. "
    "Your goal is to judge a reward process and give a score between 0 and 1. "
    "You should focus on whether the reasoning process is good rather than whether the final answer is correct."
    "### Evaluation Criteria:\n"
    "- **Logical Soundness**: Does each step follow logically from the previous one?\n"
    "- **Correct Reasoning**: Are the methods and steps used appropriate and valid? "
    "Are the facts and lemmas correctly stated and applied?\n"
    "- **Error Identification**: Are there any logical fallacies, unsupported assumptions, or incorrect steps?\n"
    "- **Language Consistency**: Is the reasoning process conducted in a single, consistent language "
    "without mixing different languages?\n"
    "- **Redundancy**: Is the reasoning concise, without unnecessary repetition or extraneous steps?\n"
    "Provide a single score from **{0, 0.1, 0.2, ..., 1.0}** based on the reasoning quality, where:\n"
    " - **0**: Completely flawed reasoning\n"
    "- **1**: Perfectly sound reasoning\n"
    "- Intermediate values (e.g., 0.3, 0.7) should reflect partial correctness or minor errors.\n"
    "Be strict, reward the good process and punish the bad one. "
    "You should only output the score without any explanation.\n"
    "    Question: {question}\n"
    "    Reasoning process: {response}\n"
    "    Your response format: <answer>your_score</answer>"
)

TRM_SYSTEM_PROMPT = "You are a helpful assistant."

EVAL_SYSTEM_PROMPT = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "Please think about this question as if you were a human pondering deeply. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions. "
    "It's encouraged to include self-reflection or verification in the reasoning process."
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE enclosed within <answer> </answer> tags, "
    "for example <think>your_thinking_process</think><answer>your_final_answer</answer>. "
    "If you use formula, please use LaTeX format."
)

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IMAGE_PLACEHOLDER = "<image>"


def _fill(template, values):
    """Substitute {name} placeholders in one pass, so text inserted for one is never rescanned for another."""
    pattern = "|".join(re.escape("{" + name + "}") for name in values)
    return re.sub(pattern, lambda match: values[match.group(0)[1:-1]], template)


def _check_problem_type(problem_type):
    if problem_type not in TYPE_TEMPLATE:
        raise InputError(f"unknown problem_type {problem_type!r}; expected one of {', '.join(PROBLEM_TYPES)}")


def format_question(problem, problem_type, options=None):
    """The training prompt text: problem (+ options), the thinking template, the problem-type suffix.

    As in the reference, options are appended only to multiple-choice problems, joined by "; " and with
    no separator after the problem text (the 130k data's problems and "A. ..." options were trained that way).
    """
    _check_problem_type(problem_type)
    if problem_type == "multiple choice" and options:
        problem = problem + "; ".join(map(str, options))
    return _fill(QUESTION_TEMPLATE, {"Question": problem}) + TYPE_TEMPLATE[problem_type]


def _strip_option_label(option, letter):
    """Drop a leading "A." / "A)" / "(A)" label when it is this option's own letter."""
    match = re.match(r"\s*\(?" + letter + r"[.)]\s*", option)
    return option[match.end():] if match else option


def format_eval_question(problem, options=None, hint=None):
    """VLMEvalKit's default multiple-choice prompt (as its Qwen2-VL wrapper builds it): "Hint: ..." when a hint is
    given, "Question: ...", then "Options:" with one "A. ..." line each; the (hinted) problem alone otherwise."""
    hint_line = f"Hint: {hint}\n" if hint else ""
    if not options:
        return hint_line + problem
    if len(options) > len(_LETTERS):
        raise InputError(f"{len(options)} options; at most {len(_LETTERS)} can be lettered")
    lines = [f"{letter}. {_strip_option_label(str(option), letter)}" for letter, option in zip(_LETTERS, options)]
    return (f"{hint_line}Question: {problem}\nOptions:\n" + "\n".join(lines)
            + "\nPlease select the correct answer from the options above.")


def _user_message(text, num_images):
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def check_image_placeholders(prompt, num_images, where):
    """A prompt that marks where its images go with "<image>" (EasyR1-style rows) needs one mark per image."""
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count and count != num_images:
        raise InputError(f"{where}: the prompt holds {count} {IMAGE_PLACEHOLDER} placeholder(s) but the row has "
                         f"{num_images} image(s)")


def _policy_user_message(text, num_images):
    """Each image part where its "<image>" stands, the placeholder text dropped; images first without any."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:
        return _user_message(text, num_images)
    check_image_placeholders(text, num_images, "policy prompt")
    content = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for piece in pieces[1:]:
        content += [{"type": "image"}] + ([{"type": "text", "text": piece}] if piece else [])
    return {"role": "user", "content": content}


def policy_messages(problem, problem_type, options=None, num_images=0, system_prompt=None, template="train",
                    hint=None):
    """Chat messages for the policy. template="train": the thinking template, system message only when given;
    template="eval": EVAL_SYSTEM_PROMPT (or `system_prompt` when given) and VLMEvalKit-style options.
    A `hint` (VLMEvalKit TSVs' hint column) goes before the problem as "Hint: ...\n" in both templates.
    Images go where the text's "<image>" placeholders stand (one per image), else before the text."""
    if template == "train":
        text = format_question(f"Hint: {hint}\n{problem}" if hint else problem, problem_type, options)
    elif template == "eval":
        _check_problem_type(problem_type)
        text = format_eval_question(problem, options, hint)
        system_prompt = system_prompt or EVAL_SYSTEM_PROMPT
    else:
        raise InputError(f"unknown prompt template {template!r}; expected 'train' or 'eval'")
    messages = [_policy_user_message(text, num_images)]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def trm_messages(question, response, num_images):
    """The thinking reward model's chat: the only builder of it (TRM training, annotation and scoring all use it).

    The question is prefixed with "<image> " when images go along, unless it already holds an "<image>"
    marker (the reference's rule); every image is sent, in order, before the text.
    """
    if num_images > 0 and "<image>" not in question:
        question = f"<image> {question}"
    text = _fill(TRM_PROMPT, {"question": question, "response": response})
    return [{"role": "system", "content": TRM_SYSTEM_PROMPT}, _user_message(text, num_images)]


def image_to_data_url(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_openai_messages(messages, images):
    """Copy of `messages` with each {"type": "image"} part, in order, replaced by a PNG data-URL image_url part."""
    images = list(images)
    placeholders = sum(1 for m in messages if isinstance(m["content"], list)
                       for part in m["content"] if part.get("type") == "image")
    if placeholders != len(images):
        raise InputError(f"messages hold {placeholders} image placeholders but {len(images)} images were given")
    remaining = iter(images)
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": image_to_data_url(next(remaining))}}
                       if part.get("type") == "image" else dict(part) for part in content]
        converted.append({**message, "content": content})
    return converted
