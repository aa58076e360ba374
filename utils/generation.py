"""Generation shared by step-2 rollouts, step-3 evaluation and step-1 evaluation: the hf and vLLM engines.

Both engines get every sampling parameter from one `Sampling`, explicitly. A released checkpoint's
generation_config.json (Qwen2.5-VL-Instruct: temperature 0.1, top_p 0.001, top_k 1, repetition_penalty 1.05)
otherwise fills whatever a call leaves out (transformers merges it into the call's config, vLLM's server into
the request), so one engine would sample from another distribution than the other, or than the trainer's pi_old.
Only the checkpoint's stop tokens are kept (Qwen2.5-VL stops on both <|im_end|> and <|endoftext|>).
"""
import hashlib
from dataclasses import dataclass

import torch

from sophiavl.utils.cli import InputError
from sophiavl.utils.model import chat_inputs, chat_texts, decode_completions, template_prefill
from sophiavl.utils.prompts import POLICY_THINKING
from sophiavl.utils.model_family import family_of, vllm_cpu_refusal
from sophiavl.utils.vision import pixel_limits


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy. top_k 0 and min_p 0 are off; presence / frequency penalties are vLLM's only
    and pinned to 0 so that the two engines agree."""
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def placeholder_token_ids(processor) -> list[int]:
    """<|image_pad|> / <|video_pad|>: generating one would make the training forward take it for an
    image slot ("Image features and image tokens do not match"), so both engines never sample them."""
    tokenizer = processor.tokenizer
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")
            if tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id]


def stop_token_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def hf_generation_config(model, processor, sampling: Sampling, **extra):
    """A GenerationConfig with every field that shapes the distribution set, so none comes from the checkpoint
    (transformers fills the unset fields of a call's config from the model's generation_config.json)."""
    from transformers import GenerationConfig

    checkpoint = model.generation_config
    fields = GenerationConfig._get_default_generation_params()  # a value for every field transformers fills
    fields.pop("max_length")  # max_new_tokens decides
    fields.update(
        bos_token_id=checkpoint.bos_token_id, eos_token_id=stop_token_ids(model),
        pad_token_id=processor.tokenizer.pad_token_id,
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not sampling.greedy,
        temperature=1.0 if sampling.greedy else sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        suppress_tokens=placeholder_token_ids(processor),
        **extra,
    )
    return GenerationConfig(**fields)


@torch.no_grad()
def hf_generate(model, processor, batch_messages: list, batch_images: list, sampling: Sampling, *,
                num_return_sequences: int = 1, return_logps: bool = False, enable_thinking: bool = POLICY_THINKING):
    """Generate from a plain (not ZeRO-partitioned) model. Returns texts and token ids of the completions,
    `num_return_sequences` consecutive ones per chat (and with `return_logps` the per-token log-probs of the
    distribution each token was drawn from, after temperature / top-k / top-p). The ids end with the stop token
    when the model emitted one (it is part of what the policy chose); padding is removed. Each text starts with what
    the chat template prefilled of the answer (utils.model.template_prefill), which the ids do not hold."""
    prompts = chat_texts(processor, batch_messages, enable_thinking=enable_thinking)
    inputs = chat_inputs(processor, batch_messages, batch_images, enable_thinking=enable_thinking).to(model.device)
    config = hf_generation_config(model, processor, sampling, num_return_sequences=num_return_sequences,
                                  return_dict_in_generate=True, output_scores=return_logps)
    output = model.generate(**inputs, generation_config=config)
    completion_ids = output.sequences[:, inputs["input_ids"].shape[1]:].tolist()
    stops = set(stop_token_ids(model))
    token_ids = [_until_stop(ids, stops, processor.tokenizer.pad_token_id) for ids in completion_ids]
    prefills = [template_prefill(prompt) for prompt in prompts for _ in range(num_return_sequences)]
    texts = [prefill + text for prefill, text in zip(prefills, decode_completions(processor.tokenizer, token_ids))]
    if not return_logps:
        return texts, token_ids
    scores = torch.stack(output.scores, dim=1).float().log_softmax(dim=-1)  # [B, T, V], processed scores
    chosen = scores.gather(-1, output.sequences[:, -scores.shape[1]:, None]).squeeze(-1)
    logps = [chosen[row, :len(ids)].tolist() for row, ids in enumerate(token_ids)]
    return texts, token_ids, logps


def _until_stop(ids: list[int], stops: set, pad_id: int) -> list[int]:
    for position, token in enumerate(ids):
        if token in stops:
            return ids[: position + 1]
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids


def build_vllm(
    model_path: str,
    processor,
    *,
    dtype: str,
    max_model_len: int,
    max_images: int,
    seed: int,
    gpu_memory_utilization: float = 0.8,
    tensor_parallel_size: int = 1,
    colocated: bool = False,
    enable_sleep_mode: bool = False,
):
    """An in-process vLLM engine. `colocated=True` runs it inside already-started torch.distributed
    ranks (DeepSpeed's), each rank an independent data-parallel copy (vLLM's external launcher).
    The processor's pixel limits go to vLLM too (images arrive resized by utils.vision already; the limits
    size vLLM's memory profiling and encoder cache for them rather than for the checkpoint's 12.8M pixels)."""
    import os

    if not torch.cuda.is_available() and os.path.isfile(os.path.join(model_path, "config.json")):
        refusal = vllm_cpu_refusal(family_of(model_path), dtype)
        if refusal:
            raise InputError(f"{model_path}: {refusal}")
    if not torch.cuda.is_available():
        # vllm-cpu: keep the engine in this process and small; don't pin OpenMP threads to cores
        # that DeepSpeed's other ranks use too.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM

    extra = {"distributed_executor_backend": "external_launcher"} if colocated else {}
    if torch.cuda.is_available():
        extra["gpu_memory_utilization"] = gpu_memory_utilization
        extra["enable_sleep_mode"] = enable_sleep_mode
    min_pixels, max_pixels = pixel_limits(processor)
    return LLM(
        model=model_path,
        dtype=dtype,
        max_model_len=max_model_len,
        limit_mm_per_prompt={"image": max(max_images, 1), "video": 0},
        mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
        tensor_parallel_size=tensor_parallel_size,
        seed=seed,
        enforce_eager=not torch.cuda.is_available(),
        # log-probs after temperature / top-k / top-p: the distribution the trainer's pi_old is compared with
        logprobs_mode="processed_logprobs",
        **extra,
    )


def close_vllm(llm) -> None:
    """Shut an in-process vLLM engine down now. Its shutdown destroys vLLM's process groups and torch.distributed's
    default one; at interpreter exit, after utils.distributed.shutdown, it fails ("Invalid process group specified")."""
    llm.llm_engine.engine_core.shutdown()


def vllm_sampling_params(processor, sampling: Sampling, *, n: int = 1, seed: int | None = None,
                         logprobs: int | None = None):
    """vLLM SamplingParams with every field of `sampling` set (a user SamplingParams never takes the checkpoint's
    generation defaults; its stop tokens still apply) and, like hf_generate, no image/video placeholder sampled."""
    from vllm import SamplingParams

    return SamplingParams(
        n=n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1, min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty, presence_penalty=0.0, frequency_penalty=0.0,
        seed=seed, logprobs=logprobs, logit_bias={i: -1e4 for i in placeholder_token_ids(processor)},
    )


def prompt_seed(seed: int, step: int, prompt_index: int) -> int:
    """An independent sampling seed per prompt, hashed from (seed, step, global prompt index). vLLM seeds the
    n samples of a request seed, seed+1, ...: consecutive per-prompt seeds (base + index) would hand
    neighbouring prompts the same noise, and identical prompts the same group."""
    digest = hashlib.blake2b(f"{seed}/{step}/{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31


def vllm_generate(llm, processor, batch_messages: list, batch_images: list, sampling_params, *,
                  enable_thinking: bool = POLICY_THINKING) -> list:
    """Generate with vLLM from the same chat-template text the HF path tokenizes. `sampling_params`: one for the
    batch or one per chat. Returns vLLM's RequestOutputs, one per chat (each with its n completions); their texts
    as hf_generate's are vllm_texts(processor, outputs)."""
    requests = []
    for prompt, images in zip(chat_texts(processor, batch_messages, enable_thinking=enable_thinking), batch_images):
        request = {"prompt": prompt}
        if images:
            request["multi_modal_data"] = {"image": images}
        requests.append(request)
    return llm.generate(requests, sampling_params, use_tqdm=False)


def vllm_texts(processor, outputs) -> list[list[str]]:
    """The texts of each RequestOutput's completions as hf_generate writes them: the template's prefill, then the
    completion decoded from its ids with the think tags kept (vLLM's own text skips them where they are special)."""
    return [[template_prefill(output.prompt) + text
             for text in decode_completions(processor.tokenizer, [list(s.token_ids) for s in output.outputs])]
            for output in outputs]
