"""Write tests/utils/format_parity_cases.jsonl: numerical responses judged by the reference's own rules.

    .venv/bin/python tests/utils/make_format_parity_cases.py

The rules are those of verl/utils/reward_score/math.py and verl/workers/reward/custom.py in the SophiaVL-R1
repository: `$` removed from response and ground truth, the ground truth unwrapped from its first
<answer>...</answer>, the format gate re.fullmatch(FORMAT, response), the first <answer>...</answer> graded by
mathruler's grade_answer. Each line: response, truth, format (bool), answer (str or null), reward.
tests/utils/test_outcome_reward.py checks utils.outcome_reward against every line.
"""
import json
import os
import random
import re

from mathruler.grader import grade_answer

FORMAT = re.compile(r"<think>(.*?)</think>.*<answer>(.*?)</answer>.*", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "format_parity_cases.jsonl")


def reference(response, truth):
    wrapped = ANSWER.search(truth)
    truth = (wrapped.group(1) if wrapped else truth).replace("$", "")
    response = response.replace("$", "")
    ok = FORMAT.fullmatch(response) is not None
    match = ANSWER.search(response)
    answer = match.group(1) if match else None
    reward = 1.0 if ok and grade_answer(answer, truth) else 0.0
    return {"format": ok, "answer": answer, "reward": reward}


def cases(rng):
    answers = ["5", " 5 ", "\n5\n", "5.0", "$5$", "6", "", "x"]
    middles = ["", " ", "\n\n", " so ", "\nFinal answer: ", "<answer>6</answer>"]
    tails = ["", "\n", ".", " done", "<answer>6</answer>", "</answer>", " <answer>", "</think>"]
    thinks = ["a", "", "maybe <answer>6</answer> or", "<think>b</think>", "x<answer>5"]
    for answer in answers:
        for middle in middles:
            for tail in tails:
                yield f"<think>{rng.choice(thinks)}</think>{middle}<answer>{answer}</answer>{tail}"
    tokens = ["<think>", "</think>", "<answer>", "</answer>", "5", "6", " ", "\n", ".", " done", "$", "x"]
    for _ in range(500):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 10)))
        yield "<think>" + text if rng.random() < 0.7 else text


def main():
    rng = random.Random(15)
    rows = {}
    for response in cases(rng):
        truth = rng.choice(["5", "<answer>5</answer>", "$5$"])
        rows.setdefault(response, {"response": response, "truth": truth, **reference(response, truth)})
    with open(OUT, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows.values())
    passed = sum(row["format"] for row in rows.values())
    print(f"{len(rows)} cases ({passed} in the reference's format, "
          f"{sum(row['reward'] for row in rows.values()):.0f} rewarded) -> {OUT}")


if __name__ == "__main__":
    main()
