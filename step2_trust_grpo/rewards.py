"""Step-2 rewards: outcome R^o per response, thinking R^t from the TRM server, Trust-GRPO's sum.

Completions are laid out group by group: the N samples of prompt k are entries k*N .. k*N+N-1.
"""
from dataclasses import dataclass, field, fields

from sophiavl.utils.outcome_reward import outcome_reward
from sophiavl.utils.trust import trust_rewards

# --reference-parity: the reference code skips the TRM for uniform groups and for clearly wrong responses
UNIFORM_RIGHT, UNIFORM_WRONG, CLEARLY_WRONG = 0.9, 0.1, 0.2


def outcome_rewards(texts: list[str], rows: list[dict], num_generations: int, max_answer_chars: int,
                    strict_format: bool = False) -> list[float]:
    return [
        outcome_reward(text, rows[i // num_generations]["answer"], rows[i // num_generations]["problem_type"],
                       max_answer_chars=max_answer_chars, strict_format=strict_format)
        for i, text in enumerate(texts)
    ]


@dataclass
class ThinkingStats:
    calls: int = 0
    failures: int = 0
    failed_groups: int = 0
    skipped_groups: int = 0
    latencies: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def thinking_rewards(client, questions: list[str], texts: list[str], images: list[list], outcome: list[float],
                     num_generations: int, *, reference_parity: bool) -> tuple[list[float], ThinkingStats]:
    """R^t for every completion. A group in which any TRM request failed (after the client's retries)
    gets R^t = 0 for all its responses, so a half-scored group cannot tilt its advantages; this is
    counted in the stats. With reference_parity, uniform groups and responses with R^o < 0.2 get
    R^t = 0 without a call, as the reference code does."""
    stats = ThinkingStats()
    wanted = []
    for start in range(0, len(texts), num_generations):
        group = outcome[start:start + num_generations]
        if reference_parity and (min(group) >= UNIFORM_RIGHT or max(group) <= UNIFORM_WRONG):
            stats.skipped_groups += 1
            continue
        wanted += [i for i in range(start, start + num_generations)
                   if not (reference_parity and outcome[i] < CLEARLY_WRONG)]
    items = [(questions[i // num_generations], texts[i], images[i // num_generations]) for i in wanted]
    results = client.score_many_sync(items) if items else []

    thinking = [0.0] * len(texts)
    failed_groups = set()
    for i, result in zip(wanted, results):
        stats.latencies.append(result.latency_s)
        if result.score is None:
            failed_groups.add(i // num_generations)
            stats.errors.append(result.error)
        else:
            thinking[i] = result.score
    for group in failed_groups:
        thinking[group * num_generations:(group + 1) * num_generations] = [0.0] * num_generations
    stats.calls, stats.failures, stats.failed_groups = len(items), len(stats.errors), len(failed_groups)
    return thinking, stats


def final_rewards(outcome: list[float], thinking: list[float], num_generations: int, step: int, *, alpha: float,
                  horizon: float, use_trust: bool, use_anneal: bool) -> tuple[list[float], list[float]]:
    """Trust-GRPO's R_i for every completion and the gamma applied to each group."""
    rewards, gammas = [], []
    for start in range(0, len(outcome), num_generations):
        group = slice(start, start + num_generations)
        group_rewards, gamma = trust_rewards(outcome[group], thinking[group], step, alpha=alpha, horizon=horizon,
                                             use_trust=use_trust, use_anneal=use_anneal)
        rewards += group_rewards
        gammas.append(gamma)
    return rewards, gammas


def overlong_penalties(lengths: list[int], max_completion_length: int, buffer: int, penalty: float) -> list[float]:
    """DAPO's soft overlong punishment, to add to the final rewards: 0 up to max_completion_length - buffer
    tokens, then falling linearly to -penalty at max_completion_length (and beyond)."""
    start = max_completion_length - buffer
    return [-penalty * min(max(length - start, 0), buffer) / buffer for length in lengths]


def truncated(token_ids: list[list[int]], max_completion_length: int, stop_ids: set) -> list[bool]:
    """Completions cut at the length cap: max_completion_length tokens or more, the last not a stop token
    (both engines keep the stop token the policy chose)."""
    return [len(ids) >= max_completion_length and (not ids or ids[-1] not in stop_ids) for ids in token_ids]


def merge_thinking_stats(stats: list[ThinkingStats]) -> ThinkingStats:
    """One step's judge statistics over its --dynamic-sampling rounds."""
    return ThinkingStats(**{f.name: sum((getattr(s, f.name) for s in stats), [] if f.name in ("latencies", "errors")
                                        else 0) for f in fields(ThinkingStats)})
