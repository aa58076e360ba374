"""True quality of a tiny policy's reasoning, scored against what the synthetic task generator knows.

Two measures. `trace_quality` (v1's, docs/ablations.md): a completion's `<think>` split into sentences and
matched against the row's correct steps, e.g. ["the shape is red", "red is option A"], as multisets:

    precision = matched sentences / sentences written     (repetition, fillers, wrong facts, contradictions)
    recall    = matched sentences / reference steps       (missing or wrong steps, empty thinking)
    quality   = F1 of the two, 0 when there is no <think> or it is empty

`oracle_score`: the strong judge of the tiny world, on the TRM's 0-1 scale in steps of 0.1 (served behind
/v1/chat/completions by demo/oracle_server.py). Every sentence is read as one of the steps the tasks' reasoning
takes (CLAIMS) and checked on the five criteria of the TRM prompt that are checkable here:

    correct facts           an observation ("the shape is red", "a square at the top left", "3 plus 4 is 7"'s
                            operands, "red is option A") must be true of the row's image and question   -0.5 each
    steps that follow       a derived step must follow from the steps before it ("red is option A" needs "the
                            shape is red" before it; "that makes 2 squares" two squares listed; "3 plus 4 is 8"
                            does not follow)                                                           -0.4 each
    answer from the steps   the <answer> must be what the steps reached (the last step that commits to one) -0.7
    no repetition           each copy of a sentence said before -0.1; each sentence that is no step of the task
                            (a filler, garbage) -0.1
    one language            any non-ASCII character in the thinking                                        -0.3

    score = max(0, 1.0 - penalties); no or empty <think> scores 0.

Like the TRM prompt, it judges the reasoning, not whether the final answer is right: a wrong answer reached
soundly from a wrong observation loses only the wrong fact's 0.5.
"""
import collections
import copy
import re

THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def think_text(completion: str) -> str:
    match = THINK.search(completion)
    return match.group(1).strip() if match else ""


def sentences(text: str) -> list[str]:
    return [" ".join(part.lower().split()) for part in re.split(r"[.!?。]", text) if part.strip()]


def trace_quality(completion: str, reference_steps: list[str]) -> float:
    written = sentences(think_text(completion))
    reference = [" ".join(step.lower().split()) for step in reference_steps]
    if not written or not reference:
        return 0.0
    matched = sum((collections.Counter(written) & collections.Counter(reference)).values())
    if matched == 0:
        return 0.0
    precision, recall = matched / len(written), matched / len(reference)
    return 2 * precision * recall / (precision + recall)


def think_words(completion: str) -> int:
    """Length of the reasoning in words (the tiny BPE's tokens are not comparable across texts)."""
    return len(think_text(completion).split())


# ---- the oracle judge: the tiny world's strong judge (demo/oracle_server.py serves it) ----
# Every step the synthetic tasks' reasoning can take, as a claim: (kind, pattern). Observations state a fact of the
# image or question (checked against the row's `facts`); derived steps follow from earlier steps, or do not.
COLOUR = "(red|green|blue|yellow|white)"
CLAIMS = {
    "shape_colour": rf"the shape is {COLOUR}", "background": rf"the background is {COLOUR}",
    "option": rf"{COLOUR} is option ([a-d])",
    "square": r"a square at the (top left|top right|bottom left|bottom right)", "count": r"that makes (\d+) squares?",
    "letters": r"the letters are ([a-z](?: [a-z])*)", "spell": r"they spell ([a-z]+)",
    "colour": rf"the colour is {COLOUR}", "shape": r"the shape is a (circle|square|triangle)",
    "sum": r"(\d+) plus (\d+) is (\d+)", "student": r"the student says (\d+)", "so_sum": r"so the sum is (\d+)",
}
FAMILY_CLAIMS = {"colour": ("shape_colour", "background", "option"), "count": ("square", "count"),
                 "word": ("letters", "spell"), "describe": ("colour", "shape"), "arithmetic": ("sum", "student", "so_sum")}
FAMILY_CLAIMS.update(tint=FAMILY_CLAIMS["colour"], hint_sum=FAMILY_CLAIMS["arithmetic"])  # demo/shortcut_tasks.py
NEGATIONS = ((" is not ", " is "), (" are not ", " are "), (" does not make ", " makes "), (" do not spell ", " spell "))
# The combination rule, in tenths off a perfect 1.0 (clamped at 0): the penalties of demo/trm_traces.py where the
# flaw is the same (extraneous 1, repetition 1 a copy, language 3, unsupported answer 7, wrong fact 5).
PENALTY_TENTHS = {"false_facts": 5, "not_following": 4, "unsupported_answer": 7, "repeats": 1, "extraneous": 1,
                  "language_switch": 3}


def _parse(sentence: str, kinds) -> tuple[str, tuple, bool] | None:
    """(kind, values, negated) of a sentence of one of `kinds`, None when it states none of them."""
    text = sentence.removeprefix("but ")
    negated = text.startswith("it is not true that ")
    text = text.removeprefix("it is not true that ")
    for negative, positive in NEGATIONS if not negated else ():
        if negative in f" {text} ":
            text, negated = f" {text} ".replace(negative, positive, 1).strip(), True
            break
    for kind in kinds:
        match = re.fullmatch(CLAIMS[kind], text)
        if match:
            return kind, match.groups(), negated
    return None


def _check(kind: str, values: tuple, row: dict, state: dict) -> tuple[bool | None, bool | None, str | None]:
    """(true fact?, follows?, the answer it commits to) of one claim; None where the question does not apply.
    `state` holds what the earlier steps established."""
    facts = row["facts"]
    letters = {option.split(".")[1].strip().lower(): option[0].lower() for option in row.get("options") or []}
    if kind == "shape_colour":
        state["colour"] = values[0]
        return values[0] == facts.get("colour"), None, letters.get(values[0])
    if kind == "background":
        return values[0] == facts.get("background"), None, None
    if kind == "option":
        return letters.get(values[0]) == values[1], state.get("colour") == values[0], values[1]
    if kind == "square":
        state.setdefault("squares", set()).add(values[0])
        return values[0] in facts["squares"], None, None
    if kind == "count":
        return None, int(values[0]) == len(state.get("squares", ())), values[0]
    if kind == "letters":
        state["letters"] = values[0].replace(" ", "")
        return state["letters"] == facts["word"].lower(), None, None
    if kind == "spell":
        return None, values[0] == state.get("letters"), values[0]
    if kind in ("colour", "shape"):
        state[kind] = values[0]
        both = "colour" in state and "shape" in state
        return values[0] == facts[kind], None, f"{state['colour']} {state['shape']}" if both else None
    if kind == "sum":
        a, b, total = (int(v) for v in values)
        follows = a + b == total
        if follows:
            state.setdefault("sums", set()).add(total)
        return (a, b) == (facts["a"], facts["b"]), follows, values[2]
    if kind == "student":
        return int(values[0]) == facts.get("hint"), None, None
    return None, int(values[0]) in state.get("sums", ()), values[0]  # so_sum


def oracle_criteria(completion: str, row: dict) -> dict:
    """The five checkable criteria of the TRM prompt, counted on one trace of `row` (a synthetic task row with
    `facts`, `options`, `solution` and `data_source`): false facts, steps that do not follow, whether the answer
    follows from the steps, repeats and extraneous sentences (redundancy), a language switch."""
    written = sentences(think_text(completion))
    found = {"no_reasoning": not written, "false_facts": 0, "not_following": 0, "unsupported_answer": 0,
             "repeats": 0, "extraneous": 0, "language_switch": any(ord(ch) > 127 for ch in think_text(completion)),
             "claims": []}
    kinds = FAMILY_CLAIMS[row["data_source"].split("/")[-1]]
    state, conclusion, seen = {}, None, set()
    for sentence in written:
        if sentence in seen:
            found["repeats"] += 1
            continue
        seen.add(sentence)
        claim = _parse(sentence, kinds)
        if claim is None:
            found["extraneous"] += sentence.isascii()  # a sentence in another language counts as the switch only
            continue
        kind, values, negated = claim
        found["claims"].append(kind)
        if negated:  # a negation is wrong where the claim it negates is right
            fact, follows, _ = _check(kind, values, row, copy.deepcopy(state))
            found["false_facts" if fact is not None else "not_following"] += bool(fact if fact is not None else follows)
            continue
        fact, follows, commits = _check(kind, values, row, state)
        found["false_facts"] += fact is False
        found["not_following"] += follows is False
        conclusion = commits if commits is not None else conclusion
    answer = re.search(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    given = " ".join(answer.group(1).lower().split()) if answer else None
    found["unsupported_answer"] = int(given is None or given != conclusion)
    return found


def oracle_score(completion: str, row: dict) -> float:
    """The oracle's score on the TRM's grid {0, 0.1, ..., 1}: 1.0 less the tenths of PENALTY_TENTHS for each
    violation, at least 0; no or empty <think> scores 0."""
    found = oracle_criteria(completion, row)
    if found["no_reasoning"]:
        return 0.0
    tenths = sum(PENALTY_TENTHS[name] * int(found[name]) for name in PENALTY_TENTHS)
    return max(0, 10 - tenths) / 10
