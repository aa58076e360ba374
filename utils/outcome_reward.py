"""Rule-based outcome reward R^o per problem type, and the TRM score parser.

Everything that reads model output is linear-time (str.find, no backtracking regex on the raw response) and
never raises on a response string: degenerate rollouts score 0 instead of stalling or crashing training.
"""
import atexit
import functools
import json
import math
import os
import re
import select
import string
import subprocess
import sys
import threading

from sophiavl.utils.cli import InputError
from sophiavl.utils.prompts import PROBLEM_TYPES

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# --strict-format's gate. "\s*+" (possessive) and the literal prefix keep the scan linear and inside the regex
# engine's C loop: a megabyte of "</think>" costs milliseconds, where a Python loop over the tags cost ~80 ms.
_THINK_THEN_ANSWER = re.compile(r"</think>\s*+<answer>")


def has_think_answer_format(text, *, strict=False):
    """The reference's verdict, re.fullmatch(r"<think>(.*?)</think>.*<answer>(.*?)</answer>.*", text, re.DOTALL),
    in linear time: the text opens with <think>, and after some </think> come an <answer> and then an </answer>,
    with any text between and after. The earliest of each tag leaves the most room for the next, so three finds
    decide it.

    strict: re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", text, re.DOTALL) instead: only whitespace
    between </think> and <answer>, nothing after the final </answer>."""
    if not text.startswith(THINK_OPEN):
        return False
    if strict:
        # endpos: the <answer> must end before the final </answer> starts
        return text.endswith(ANSWER_CLOSE) and _THINK_THEN_ANSWER.search(
            text, len(THINK_OPEN), len(text) - len(ANSWER_CLOSE)) is not None
    think_end = text.find(THINK_CLOSE, len(THINK_OPEN))
    if think_end == -1:
        return False
    answer_start = text.find(ANSWER_OPEN, think_end + len(THINK_CLOSE))
    return answer_start != -1 and text.find(ANSWER_CLOSE, answer_start + len(ANSWER_OPEN)) != -1


def extract_answer(text, *, last=False):
    """The content of the first <answer>...</answer> in `text` (the reference's
    re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)), or None; with last=True, of the last one."""
    if last:
        end = text.rfind(ANSWER_CLOSE)
        start = text.rfind(ANSWER_OPEN, 0, end) if end != -1 else -1
    else:
        start = text.find(ANSWER_OPEN)
        end = text.find(ANSWER_CLOSE, start + len(ANSWER_OPEN)) if start != -1 else -1
    if start == -1 or end == -1:
        return None
    return text[start + len(ANSWER_OPEN):end]


def _plain_number(text):
    """float(text) for plain decimal numbers ("5", "-0.5", "1,234.5", "1e-3"), else None.
    Commas count only as thousands separators: "1,2" is not 12."""
    text = text.replace(" ", "")
    if "," in text:
        if not re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?", text):
            return None
        text = text.replace(",", "")
    if not text or any(ch not in "0123456789.+-eE" for ch in text):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# mathruler hands sympy whatever parses, and sympy evaluates it: short answers can hang it for minutes or exhaust
# memory (big powers "2^(9*9*9)", "5^-92", "**"; factorials "99999999!"; huge floats "1e999999\\sqrt{2}";
# sequence repetition "(1,)99999999", "[1]99999999", with mathruler turning " and " / " or " into commas;
# expansions like "((x+y+2)^9)^9"). mathruler's own guard misses all of these. So sympy only sees short answers
# made of the characters below, with at most one one-digit power ("10^{-5}"; degrees "45^\\circ" are none) and
# one free letter besides LaTeX commands and the units mathruler strips ("x=5", "5 cm"), and it runs in a
# worker process under a time and memory limit for whatever still slips through. Other answers score by
# exact text only.
_SYMPY_MAX_CHARS = 200
_SYMPY_CHARS = set(string.ascii_letters + string.digits + " +-*/^().{}=\\%√π×·∞°−")
_SMALL_POWER = re.compile(r"\^\s*(?:\{\s*-?\s*\d\s*\}|\(\s*-?\s*\d\s*\)|-?\s*\d(?![\d.]))")
_NOT_SYMPY_INPUT = re.compile(  # removed before counting powers and letters: mathruler strips or maps them
    r"\^\s*\{?\s*\\circ\s*\}?|\\[a-zA-Z]+|(?:degree|cm|centimeter|meter|mile|second|minute|hour|day|week|month"
    r"|year|foot|feet|inch|yard)(?:es)?s?")
_FLOAT_EXPONENT = re.compile(r"\d\s*[eE]\s*[-+]?\s*\d")
_SYMPY_TIMEOUT_S = 3.0
_SYMPY_STARTUP_S = 60.0
_SYMPY_MEMORY_BYTES = 2 << 30


def _safe_for_sympy(answer):
    if len(answer) > _SYMPY_MAX_CHARS or not set(answer) <= _SYMPY_CHARS:
        return False
    if "**" in answer or " and " in answer or " or " in answer or _FLOAT_EXPONENT.search(answer):
        return False
    answer = _NOT_SYMPY_INPUT.sub(" ", answer)
    carets = answer.count("^")
    if carets > 1 or len(_SMALL_POWER.findall(answer)) != carets:
        return False
    return len({ch for ch in answer if ch.isalpha()}) <= 1


_SYMPY_WORKER_CODE = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({_SYMPY_MEMORY_BYTES}, {_SYMPY_MEMORY_BYTES}))
from mathruler.grader import grade_answer
print("ready", flush=True)
for line in sys.stdin:
    answer, truth = json.loads(line)
    try:
        verdict = bool(grade_answer(answer, truth))
    except Exception:
        verdict = False
    print(json.dumps(verdict), flush=True)
"""


class MathWorkerError(RuntimeError):
    """The mathruler worker process cannot start: an installation problem, never a property of a response."""


class _SympyWorker:
    """mathruler in a child process, so an answer that still sends sympy into an exponential expansion
    ("(\\sqrt{2}+1)(\\sqrt{3}+1)..." over a dozen factors) costs a timeout and a restart, not the run."""

    def __init__(self):
        self._process, self._owner_pid = None, os.getpid()
        self._lock = threading.Lock()
        atexit.register(self.stop)

    def stop(self):
        if self._process is not None and self._owner_pid == os.getpid():
            self._process.kill()
            self._process.wait()
            self._process = None

    def _read_line(self, timeout_s):
        readable, _, _ = select.select([self._process.stdout], [], [], timeout_s)
        return self._process.stdout.readline().strip() if readable else None

    def _start(self):
        self._process = subprocess.Popen([sys.executable, "-c", _SYMPY_WORKER_CODE], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self._read_line(_SYMPY_STARTUP_S) != "ready":
            raise MathWorkerError(f"the mathruler worker did not start; does `{sys.executable} -c "
                                  f"'import mathruler.grader'` work (mathruler needs pylatexenc)?")

    def grade(self, answer, truth):
        if self._owner_pid != os.getpid():  # a forked child (e.g. a data loader worker) starts its own
            self._process, self._owner_pid = None, os.getpid()
            self._lock = threading.Lock()
        with self._lock:
            try:
                if self._process is None or self._process.poll() is not None:
                    self._start()
                self._process.stdin.write(json.dumps([answer, truth]) + "\n")
                self._process.stdin.flush()
                line = self._read_line(_SYMPY_TIMEOUT_S)
                if line is None:
                    self.stop()
                    return False
                return json.loads(line) is True
            except BaseException:
                self.stop()
                raise


_SYMPY_WORKER = _SympyWorker()


def numerical_reward(answer, truth):
    given, expected = _plain_number(answer), _plain_number(truth)
    if given is not None and expected is not None:
        return 1.0 if math.isclose(given, expected, rel_tol=1e-9, abs_tol=1e-12) else 0.0
    if answer.replace(" ", "") == truth.replace(" ", ""):
        return 1.0
    if not _safe_for_sympy(answer):
        return 0.0
    return 1.0 if _SYMPY_WORKER.grade(answer, truth) else 0.0


_LETTER_SEPARATORS = re.compile(r"[\s,;/&()\[\]]+")
_LEADING_OPTION_LABEL = re.compile(r"\(?([A-Z])[.):]")


def option_letters(answer):
    """The set of option letters an answer names; empty when it names none.

    Rule: (1) if, split on whitespace and , ; / & ( ) [ ] (dropping the word "and" and a piece's trailing
    "." or ":"), every piece is a single letter, those letters (upper-cased) are the set: "A", "(b)", "A, C",
    "A and C", "[B].";
    (2) otherwise a leading capital option label "B.", "B)", "(B)", "B:" gives that one letter: "B. blue";
    (3) otherwise nothing: capitals inside words ("Blue", "I think A") never count.
    """
    answer = answer.strip()
    pieces = [p.rstrip(".:") for p in _LETTER_SEPARATORS.split(answer) if p.lower() != "and"]
    pieces = [p for p in pieces if p]
    if pieces and all(len(p) == 1 and p.isascii() and p.isalpha() for p in pieces):
        return {p.upper() for p in pieces}
    label = _LEADING_OPTION_LABEL.match(answer)
    return {label.group(1)} if label else set()


def multiple_choice_reward(answer, truth):
    chosen, expected = option_letters(answer), option_letters(truth)
    return 1.0 if expected and chosen == expected else 0.0


def ocr_reward(answer, truth):
    """exp(-WER) on whitespace-split words; an empty reference only matches an empty prediction."""
    import jiwer

    reference, hypothesis = truth.split(), answer.split()
    if not reference:
        return 0.0 if hypothesis else 1.0
    if not hypothesis:
        return math.exp(-1.0)  # every reference word deleted: WER = 1
    return math.exp(-jiwer.wer(" ".join(reference), " ".join(hypothesis)))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge_reward(answer, truth):
    """Mean of ROUGE-1, ROUGE-2 and ROUGE-L F-measures (the reference's stemmer on)."""
    scores = _rouge_scorer().score(truth.replace("\n", " ").strip(), answer.replace("\n", " ").strip())
    return (scores["rouge1"].fmeasure + scores["rouge2"].fmeasure + scores["rougeL"].fmeasure) / 3


_SCORERS = {
    "numerical": numerical_reward,
    "multiple choice": multiple_choice_reward,
    "OCR": ocr_reward,
    "free-form": rouge_reward,
    "text": rouge_reward,
}
assert set(_SCORERS) == set(PROBLEM_TYPES)


def outcome_reward(response, solution, problem_type, *, max_answer_chars=4096, strict_format=False):
    """R^o in [0, 1], on the first <answer> of a response in the reference's format (has_think_answer_format);
    0 without that format or for an answer longer than `max_answer_chars`. strict_format: the stricter gate and
    the last <answer> instead (--strict-format). Never raises because of the response: InputError for an unknown
    problem_type, MathWorkerError when mathruler cannot run at all, are the only exceptions."""
    if problem_type not in _SCORERS:
        raise InputError(f"unknown problem_type {problem_type!r}; expected one of {', '.join(PROBLEM_TYPES)}")
    try:
        response = response.replace("$", "")
        if not has_think_answer_format(response, strict=strict_format):
            return 0.0
        answer = extract_answer(response, last=strict_format)
        if answer is None or len(answer) > max_answer_chars:
            return 0.0
        truth = solution.replace("$", "")
        wrapped = extract_answer(truth, last=strict_format)
        truth = wrapped if wrapped is not None else truth
        score = float(_SCORERS[problem_type](answer.strip(), truth.strip()))
    except MathWorkerError:
        raise
    except Exception:  # a library choking on a weird string must cost the rollout its reward, not the run
        return 0.0
    return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0


# A number not glued to a word or another number ("Qwen2.5" holds none); exponent allowed ("1e-1").
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


# A score is a few characters; looking further only lets a degenerate completion cost ~100 ms a megabyte.
_SCORE_SEARCH_CHARS = 4096


def _first_number(text):
    match = _NUMBER.search(text)
    return float(match.group(0)) if match else None


def parse_score(text):
    """The TRM's score from its completion, clamped to [0, 1], or None when it holds no finite number.

    The first number inside the last <answer>...</answer> wins ("<answer>score: 0.3</answer>" -> 0.3),
    else the first number anywhere; only the first 4,096 characters of either are searched. Out-of-range values
    are clamped, not rejected: "7" -> 1.0, "-0.2" -> 0.0 (the reference clamps the same way). "nan", "inf" and
    overflowing "1e999" -> None.
    """
    try:
        answer = extract_answer(text, last=True)
        value = _first_number(answer[:_SCORE_SEARCH_CHARS]) if answer is not None else None
        if value is None:
            value = _first_number(text[:_SCORE_SEARCH_CHARS])
    except Exception:
        return None
    if value is None or not math.isfinite(value):
        return None
    return min(max(value, 0.0), 1.0)
