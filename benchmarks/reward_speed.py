"""Time outcome_reward on typical responses of each problem type; prints mean microseconds per call.

Target: well under 1 ms for plain numbers and option letters (the fast paths run before any sympy).

    python benchmarks/reward_speed.py [--calls 2000]
"""
import argparse
import time

from sophiavl.utils.outcome_reward import outcome_reward, parse_score

THINK = "Let me think. The chart shows five bars; wait, let me count again... yes, five."
CASES = [
    # (label, problem type, answer inside <answer>, ground truth)
    ("numerical, plain", "numerical", "5", "<answer>5</answer>"),
    ("numerical, wrong", "numerical", "3.14", "<answer>3.1416</answer>"),
    ("multiple choice", "multiple choice", "B", "<answer>B</answer>"),
    ("multiple choice, labelled", "multiple choice", "(C) the red one", "<answer>C</answer>"),
    ("OCR", "OCR", "STOP AHEAD 500 FT", "<answer>STOP AHEAD 500 ft</answer>"),
    ("free-form", "free-form", "A man is riding a brown horse on the beach at sunset.",
     "<answer>A person rides a horse along the beach during sunset.</answer>"),
    ("text", "text", "Lee Harvey Oswald", "<answer>Lee Harvey Oswald</answer>"),
    ("no format (gate only)", "numerical", None, "<answer>5</answer>"),
]


def mean_microseconds(fn, calls):
    fn(0)  # the first call pays imports and caches
    start = time.perf_counter()
    for index in range(1, calls + 1):
        fn(index)
    return (time.perf_counter() - start) / calls * 1e6


def latex_case(index):
    """A different fraction each call: sympy caches results, so repeating one input would time the cache."""
    numerator = 2 * index + 1
    response = f"<think>{THINK}</think><answer>\\frac{{{numerator}}}{{2}}</answer>"
    return outcome_reward(response, f"<answer>{numerator / 2}</answer>", "numerical")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per case (the sympy case: a twentieth)")
    args = parser.parse_args()

    rows = []
    for label, problem_type, answer, truth in CASES:
        response = f"<think>{THINK}</think><answer>{answer}</answer>" if answer is not None else THINK
        micros = mean_microseconds(lambda _: outcome_reward(response, truth, problem_type), args.calls)
        rows.append((label, outcome_reward(response, truth, problem_type), micros))
    rows.append(("numerical, LaTeX (sympy)", latex_case(0), mean_microseconds(latex_case, max(1, args.calls // 20))))
    trm_output = "<answer>0.7</answer>"
    rows.append(("parse_score", parse_score(trm_output), mean_microseconds(lambda _: parse_score(trm_output),
                                                                            args.calls)))

    print(f"{'case':<28} {'reward':>8} {'us/call':>10}")
    for label, reward, micros in rows:
        print(f"{label:<28} {reward:>8.4f} {micros:>10.1f}")


if __name__ == "__main__":
    main()
