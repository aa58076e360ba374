"""--dynamic-sampling (DAPO's online filtering): a group whose final rewards are all equal has zero advantage
and carries no policy gradient. Such groups are dropped and more prompts are drawn, round after round, until
every rank has its share of the step's batch.

A round is a dict of lists laid out as the loop's: per prompt (rows, images, ...) or per completion (rewards,
...; the N of prompt k at k*N .. k*N+N-1), and `completions`, a rollout.Completions.
"""
import dataclasses
import random
from .rollout import Completions



def zero_spread(rewards: list[float], num_generations: int) -> list[bool]:
    """Per group: are its rewards all equal (exactly, as group_advantages' zero-advantage test)."""
    groups = [rewards[k:k + num_generations] for k in range(0, len(rewards), num_generations)]
    return [all(r == group[0] for r in group) for group in groups]


def refill_prompts(num_rows: int, seed: int, step: int, round_index: int, per_rank: int, rank: int,
                   world_size: int) -> list[int]:
    """This rank's prompts for refill round `round_index` (>= 1) of `step`: a sample of the data that is a
    function of (seed, step, round) alone, so a resumed run refills exactly as the uninterrupted one, with
    different prompts on every rank (with repeats only when the data has fewer rows than the batch)."""
    rng = random.Random(f"dynamic-sampling/{seed}/{step}/{round_index}")
    count = per_rank * world_size
    picks = rng.sample(range(num_rows), count) if count <= num_rows else [rng.randrange(num_rows) for _ in range(count)]
    return picks[rank * per_rank:(rank + 1) * per_rank]


def first_prompt_index(round_index: int, rollout_batch_size: int, rank: int, per_rank: int) -> int:
    """Index of this rank's first prompt of the round among all prompts the step draws, for per-prompt seeds:
    round 0 is the step's batch as without dynamic sampling, round r follows at r x the batch size."""
    return round_index * rollout_batch_size + rank * per_rank


def _pick(value, groups: list[int], num_prompts: int, num_generations: int):
    if isinstance(value, Completions):
        return Completions(*(_pick(getattr(value, f.name), groups, num_prompts, num_generations)
                             for f in dataclasses.fields(Completions)))
    if value is None:
        return None
    if len(value) == num_prompts:
        return [value[k] for k in groups]
    if len(value) == num_prompts * num_generations:
        return [value[k * num_generations + i] for k in groups for i in range(num_generations)]
    raise ValueError(f"a round's list of {len(value)} is neither per prompt ({num_prompts}) nor per completion")


def take_groups(rounds: list[dict], picks: list[tuple[int, int]], num_generations: int) -> dict:
    """The round dicts' entries for the (round, group) pairs in `picks` (sorted), as one round."""
    merged = {}
    for name in rounds[0]:
        parts = [_pick(rounds[r][name], [g for pr, g in picks if pr == r], len(rounds[r]["rows"]), num_generations)
                 for r in range(len(rounds))]
        if isinstance(parts[0], Completions):
            logps = [p.rollout_logps for p in parts]
            merged[name] = Completions([t for p in parts for t in p.texts], [t for p in parts for t in p.token_ids],
                                       None if any(lp is None for lp in logps) else [x for lp in logps for x in lp])
        else:
            merged[name] = None if any(p is None for p in parts) else [x for p in parts for x in p]
    return merged


def fill_batch(first_round: dict, draw_round, quota: int, num_generations: int, max_rounds: int, all_ranks_full):
    """Keep the groups of `first_round` and then of `draw_round(r)`, r = 1, 2, ..., whose rewards vary, until
    this rank has `quota` of them or `max_rounds` rounds are drawn; a rank still short then fills up with
    zero-spread groups in the order drawn. Every rank draws the same rounds: `all_ranks_full(mine: bool)`
    answers, the same on every rank, whether all of them are full. Rounds are decided one after the other,
    each on its own rewards (judge scores included). Returns (the batch as one round, metrics)."""
    rounds, kept, spare = [], [], []
    for r in range(max_rounds):
        batch = first_round if r == 0 else draw_round(r)
        rounds.append(batch)
        for group, flat in enumerate(zero_spread(batch["rewards"], num_generations)):
            (spare if flat else kept).append((r, group))
        if all_ranks_full(len(kept) >= quota):
            break
    picks = sorted(kept[:quota] + spare[:max(quota - len(kept), 0)])  # in the order drawn
    drawn = len(kept) + len(spare)
    metrics = {"dynamic_sampling/rounds": len(rounds), "dynamic_sampling/frac_zero_std_drawn": len(spare) / drawn,
               "dynamic_sampling/frac_zero_std_kept": max(quota - len(kept), 0) / quota}
    return take_groups(rounds, picks, num_generations), metrics
