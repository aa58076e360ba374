"""Memory a step-1 or step-2 run needs per GPU and per node, from the model's config.json alone, before launch.

    python -m sophiavl.utils.memory_plan --model qwen2.5-vl-7b-instruct --gpus-per-node 8 --micro-batch-size 4 \
        --gradient-checkpointing --vllm-sleep-mode          # step 2's defaults otherwise; --stage 1 for the TRM SFT

`--model` is a shipped config (utils/model_configs/: qwen2.5-vl-3b/7b-instruct, qwen3-vl-4b/8b-instruct), a
config.json or a model folder. How to read a plan and choose settings: docs/memory_plan.md. Where the numbers come from:

- ZeRO-3 model states per rank: what DeepSpeed's stage3.py allocates, read there and measured on a real engine
  (tests/utils/test_memory_plan.py): every tensor is split into ceil(numel / ranks) elements
  (partition_parameters.py, `_aligned_size // world`); the model-dtype partitions of all parameters; for the trainable
  ones a gradient partition in the model dtype (engine: grad_accum_dtype = model dtype), a separate fp32 master copy and
  AdamW's exp_avg and exp_avg_sq in fp32 (created at the first step); a reduce bucket of `reduce_bucket_size` (5e8)
  elements; at the optimizer step an fp32 flat gradient and AdamW's sqrt(exp_avg_sq) for up to `sub_group_size` (1e9)
  elements. DeepSpeed's own `estimate_zero3_model_states_mem_needs` (stage3.py: 18 B per parameter / ranks + 4 B x the
  largest layer on the GPU; with offload 18 B x 1.5 per parameter per node on the CPU) is printed beside them, and its
  `largest_layer_memory` (4 B x the most parameters one module holds, a gathered layer and its full gradient) is the
  gathered-parameter row.
- Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2:
  s*b*h*(34 + 5*a*s/h) bytes per layer) redone tensor by tensor for transformers' Qwen2.5-VL / Qwen3-VL blocks: RMSNorm
  keeps an fp32 copy of its input, SwiGLU four intermediate-wide tensors, flash / SDPA attention q, k, v, its output and
  an fp32 logsumexp and no s^2 scores (`llm_layer_bytes`, `vision_block_bytes`; checked against the bytes autograd saves
  in a tiny bf16 model). With gradient checkpointing a layer keeps only its input; one layer is recomputed in backward.
- Logits: only the completion's logits are computed (`logits_to_keep`), in the model dtype, then per row an fp32 copy
  that logsumexp keeps, and the entropy's log-probs and probabilities (step2_trust_grpo/loss.py).
- vLLM: `--vllm-gpu-memory-utilization` x the GPU is what vLLM takes (its weights, its profiled activations, the KV
  cache), checked free when it starts after the trainer's states are allocated; sleep level 1 frees it during the
  update and keeps the weights in pinned host memory.
"""
import argparse
import json
import math
import os
from dataclasses import dataclass, replace

from sophiavl.utils.cli import InputError, exit_on_input_error
from sophiavl.utils.lora import LORA_TARGETS, parse_targets

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
GIB = 2 ** 30
# The memory nvidia-smi reports: A100 40GB, H100 80GB (A100 80GB has 81,920 MiB), H200.
GPUS = {"40GB": 40_960 * 2 ** 20, "80GB": 81_559 * 2 ** 20, "141GB": 143_771 * 2 ** 20}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Shape:
    """The widths a memory plan needs, read from config.json (`shape_from_config`)."""
    family: str  # qwen2_5_vl or qwen3_vl
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool
    v_hidden: int
    v_intermediate: int
    v_depth: int
    v_heads: int
    patch: int
    temporal_patch: int
    merge: int
    in_channels: int
    v_out: int
    v_positions: int = 0  # Qwen3-VL's learned position embeddings
    deepstack: int = 0  # Qwen3-VL's extra mergers feeding early LLM layers


def load_config(model: str) -> tuple[str, dict]:
    """(name, config.json) of a shipped config (file name without .json, any case, "Qwen/" allowed), a config.json or
    a model folder."""
    shipped = os.path.join(CONFIG_DIR, model.split("/")[-1].lower() + ".json")
    path = next((p for p in (shipped, os.path.join(model, "config.json"), model) if os.path.isfile(p)), None)
    if path is None:
        names = ", ".join(sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json")))
        raise InputError(f"{model}: neither a shipped model config ({names}) nor a config.json or a model folder")
    with open(path, encoding="utf-8") as handle:
        return os.path.basename(model.rstrip("/")), json.load(handle)


def shape_from_config(config: dict) -> Shape:
    family = config.get("model_type")
    if family not in ("qwen2_5_vl", "qwen3_vl"):
        raise InputError(f"model_type {family!r}: the memory plan knows qwen2_5_vl and qwen3_vl")
    text, vision = {**config, **config.get("text_config", {})}, config["vision_config"]
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    if tied is None:
        raise InputError("config.json does not say whether lm_head is tied to the embeddings (tie_word_embeddings)")
    qwen3 = family == "qwen3_vl"
    return Shape(
        family=family, hidden=text["hidden_size"], intermediate=text["intermediate_size"],
        layers=text["num_hidden_layers"], heads=text["num_attention_heads"], kv_heads=text["num_key_value_heads"],
        head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
        vocab=text["vocab_size"], tied=bool(tied), attention_bias=text.get("attention_bias", not qwen3),
        v_hidden=vision["hidden_size"], v_intermediate=vision["intermediate_size"], v_depth=vision["depth"],
        v_heads=vision["num_heads"], patch=vision["patch_size"], temporal_patch=vision.get("temporal_patch_size", 2),
        merge=vision["spatial_merge_size"], in_channels=vision.get("in_channels", vision.get("in_chans", 3)),
        v_out=vision["out_hidden_size"], v_positions=vision.get("num_position_embeddings", 0) if qwen3 else 0,
        deepstack=len(vision.get("deepstack_visual_indexes", [])) if qwen3 else 0)


def parameter_modules(s: Shape) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """(module, part, how many of it, numel of each of its parameters) for every module with parameters, as
    transformers builds the model. part: vision, language or lm_head (absent when tied: it is the embedding)."""
    hv, iv, h, i, hq, hkv = s.v_hidden, s.v_intermediate, s.hidden, s.intermediate, s.heads * s.head_dim, \
        s.kv_heads * s.head_dim
    merged, patch_in = hv * s.merge ** 2, s.in_channels * s.temporal_patch * s.patch ** 2
    linear = lambda n_in, n_out, bias=True: (n_out * n_in, n_out) if bias else (n_out * n_in,)  # noqa: E731
    qwen3 = s.family == "qwen3_vl"
    norm = (lambda n: (n, n)) if qwen3 else (lambda n: (n,))  # vision: LayerNorm (Qwen3) or RMSNorm
    vision = [("patch_embed", 1, (hv * patch_in, hv) if qwen3 else (hv * patch_in,))]
    vision += [("pos_embed", 1, (s.v_positions * hv,))] if qwen3 else []
    vision += [("block.norm1", s.v_depth, norm(hv)), ("block.norm2", s.v_depth, norm(hv)),
               ("block.qkv", s.v_depth, linear(hv, 3 * hv)), ("block.proj", s.v_depth, linear(hv, hv))]
    mlp = ["linear_fc1", "linear_fc2"] if qwen3 else ["gate_proj", "up_proj", "down_proj"]
    vision += [(f"block.{name}", s.v_depth, linear(iv, hv) if name in ("linear_fc2", "down_proj") else linear(hv, iv))
               for name in mlp]
    for merger, count, width in [("merger", 1, hv)] + ([("deepstack_merger", s.deepstack, merged)] if qwen3 else []):
        vision += [(f"{merger}.norm", count, norm(width)), (f"{merger}.fc1", count, linear(merged, merged)),
                   (f"{merger}.fc2", count, linear(merged, s.v_out))]
    bias = s.attention_bias
    language = [("embed_tokens", 1, (s.vocab * h,)), ("layer.q_proj", s.layers, linear(h, hq, bias)),
                ("layer.k_proj", s.layers, linear(h, hkv, bias)), ("layer.v_proj", s.layers, linear(h, hkv, bias)),
                ("layer.o_proj", s.layers, linear(hq, h, False))]
    language += [("layer.q_norm", s.layers, (s.head_dim,)), ("layer.k_norm", s.layers, (s.head_dim,))] if qwen3 else []
    language += [("layer.gate_proj", s.layers, linear(h, i, False)), ("layer.up_proj", s.layers, linear(h, i, False)),
                 ("layer.down_proj", s.layers, linear(i, h, False)), ("layer.input_layernorm", s.layers, (h,)),
                 ("layer.post_attention_layernorm", s.layers, (h,)), ("norm", 1, (h,))]
    head = [] if s.tied else [("lm_head", "lm_head", 1, (s.vocab * h,))]
    return ([(m, "vision", n, t) for m, n, t in vision] + [(m, "language", n, t) for m, n, t in language] + head)


def lora_modules(s: Shape, rank: int, targets) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """The adapters peft adds for --lora-rank r (part "lora"): per target linear layer of every decoder layer,
    A (r x in) and B (out x r)."""
    if not rank:
        return []
    hq, hkv, h, i = s.heads * s.head_dim, s.kv_heads * s.head_dim, s.hidden, s.intermediate
    shapes = {"q_proj": (h, hq), "k_proj": (h, hkv), "v_proj": (h, hkv), "o_proj": (hq, h), "gate_proj": (h, i),
              "up_proj": (h, i), "down_proj": (i, h)}
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise InputError(f"--lora-target-modules {','.join(unknown)}: the plan knows the language model's "
                         f"{', '.join(shapes)}")
    return [(f"layer.{t}.lora_A + lora_B", "lora", s.layers, (rank * shapes[t][0], shapes[t][1] * rank))
            for t in targets]


def numel(modules, part: str | None = None) -> int:
    return sum(n * sum(t) for _, p, n, t in modules if part in (None, p))


def largest_layer(modules) -> int:
    """DeepSpeed's `model_to_params`: the most parameters one module holds itself (here the embedding matrix)."""
    return max(sum(t) for *_, t in modules)


def partition_numel(modules, ranks: int) -> int:
    """Elements of this rank's ZeRO-3 partitions: ceil(numel / ranks) of every tensor."""
    return sum(n * sum(-(-x // ranks) for x in t) for *_, n, t in modules)


def persisted_numel(modules, threshold: int) -> int:
    """Elements of the tensors ZeRO-3 also keeps whole on every rank (stage3_param_persistence_threshold)."""
    return sum(n * sum(x for x in t if x <= threshold) for *_, n, t in modules)


def image_tokens(s: Shape, max_pixels: int) -> int:
    """Most placeholder tokens an image takes within max_pixels: the Qwen-VL resize (utils/vision.py,
    image_token_count) snaps each side to a multiple of patch x merge pixels and keeps the area within max_pixels."""
    return max_pixels // (s.patch * s.merge) ** 2


def rms_norm_bytes(width: int, e: int) -> int:
    return 4 * width + 2 * e * width + 4  # fp32 copy of the input, the normalised and the weighted output, rstd


def layer_norm_bytes(width: int, e: int) -> int:
    return 2 * e * width + 8  # input, output, fp32 mean and rstd


def llm_layer_bytes(s: Shape, e: int) -> int:
    """Bytes one decoder layer keeps for backward, per token (no gradient checkpointing)."""
    hq, hkv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    attention = e * (2 * hq + 2 * hkv) + 4 * s.heads  # rotated q and k, v, the output, fp32 logsumexp
    qk_norm = (4 + e) * (hq + hkv) + 4 * (s.heads + s.kv_heads) if s.family == "qwen3_vl" else 0
    return 2 * rms_norm_bytes(s.hidden, e) + attention + qk_norm + 4 * e * s.intermediate  # SwiGLU: gate, up, act, prod


def vision_block_bytes(s: Shape, e: int, sdpa: bool = False) -> int:
    """Bytes one vision block keeps for backward, per patch. v is a view of the fused qkv output, which it keeps
    whole; SDPA runs window by window and concatenates, which keeps the output twice."""
    hv = s.v_hidden
    attention = 3 * e * hv + 2 * e * hv + (2 if sdpa else 1) * e * hv + 4 * s.v_heads
    if s.family == "qwen3_vl":  # LayerNorm, GELU MLP
        return 2 * layer_norm_bytes(hv, e) + attention + 2 * e * s.v_intermediate
    return 2 * rms_norm_bytes(hv, e) + attention + 4 * e * s.v_intermediate


def vision_once_bytes(s: Shape, e: int) -> int:
    """Per patch, outside the blocks: the patch-embedding input, fp32 rotary cos and sin, the mergers."""
    hv = s.v_hidden
    once = e * s.in_channels * s.temporal_patch * s.patch ** 2 + 8 * (hv // s.v_heads)
    if s.family == "qwen3_vl":  # a deepstack merger's input is also the next block's, counted there
        return once + 4 * e * hv + 8 + s.deepstack * (3 * e * hv + 8 // s.merge ** 2)
    return once + rms_norm_bytes(hv, e) + 2 * e * hv


def llm_once_bytes(s: Shape, e: int) -> int:
    return rms_norm_bytes(s.hidden, e) + 2 * e * s.head_dim + 8  # final norm, rotary cos and sin, the token ids


def prompts_per_micro_batch(micro: int, group: int) -> int:
    """Most prompts (distinct image sets) `micro` consecutive completions span, `group` completions per prompt."""
    return max(((k + 1) * micro - 1) // group - k * micro // group + 1
               for k in range(math.lcm(micro, group) // micro))


@dataclass
class Settings:
    """What the plan depends on: step 2's defaults (step2_trust_grpo/arguments.py); Settings.step1() has step 1's."""
    gpus_per_node: int = 8
    nodes: int = 1
    offload: bool = False
    micro_batch_size: int = 4
    prompt_length: int = 4096  # images' tokens included, as --max-prompt-length counts them
    completion_length: int = 1024
    logits_length: int | None = None  # positions whose logits are computed (default: the completion)
    max_pixels: int = 1003520
    images_per_prompt: int = 1
    num_generations: int = 8  # the completions of a prompt share its images in a micro-batch (step 2)
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    attn_implementation: str = "flash_attention_2"
    freeze_vision_tower: bool = False
    lora_rank: int = 0  # > 0: only LoRA adapters on the language model train (utils/lora.py)
    lora_target_modules: tuple = LORA_TARGETS
    entropy_grad: bool = True  # --entropy-coef > 0
    vllm_gpu_memory_utilization: float = 0.4  # 0: no colocated vLLM
    vllm_sleep_mode: bool = False
    vllm_tensor_parallel_size: int = 1
    hf_rollout_sequences: int = 0  # --rollout-engine hf: completions one rank generates at once (0: no such engine)
    kl_coef: float = 0.04  # > 0: a ZeRO-3 reference model
    offload_reference: bool = False  # its partition in host memory (--offload-reference)
    param_persistence_threshold: int = 10_000
    headroom_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation

    @classmethod
    def step1(cls, **overrides) -> "Settings":
        """The TRM SFT: rows of --max-length tokens, each with its own images, only the target's logits (~10 tokens)."""
        defaults = dict(prompt_length=8192, completion_length=0, logits_length=16, num_generations=1,
                        entropy_grad=False, vllm_gpu_memory_utilization=0.0, kl_coef=0.0)
        return cls(**{**defaults, **overrides})

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def phases(self) -> list[str]:
        return (["rollout"] if self.vllm_gpu_memory_utilization or self.hf_rollout_sequences else []) + \
            ["update", "step"]


def zero3_sizes() -> dict:
    """The ZeRO-3 sizes the plan uses: ours (utils/ds_config.py) and DeepSpeed's defaults for the rest."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from sophiavl.utils.ds_config import zero3_train_config

    ours = zero3_train_config(micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, bf16=True)
    defaults = DeepSpeedZeroConfig()
    return {"gather": ours["zero_optimization"]["stage3_max_live_parameters"] +
            ours["zero_optimization"]["stage3_prefetch_bucket_size"],
            "reduce_bucket": defaults.reduce_bucket_size, "sub_group": defaults.sub_group_size}


def model_state_bytes(modules, trainable, settings: Settings) -> dict:
    """Per-rank bytes of the ZeRO-3 policy (DeepSpeed stage3.py, see the module docstring). `trainable`: the modules
    the optimizer gets: all of them for full fine-tuning, the adapter matrices for LoRA (lora_modules), which `modules`
    then includes too."""
    e, ranks, sizes = DTYPE_BYTES[settings.dtype], settings.world_size, zero3_sizes()
    weights, train = partition_numel(modules, ranks), partition_numel(trainable, ranks)
    return {"weights": e * weights + e * persisted_numel(modules, settings.param_persistence_threshold),
            "gradients": e * train, "master": 4 * train, "adam": 8 * train,
            "reduce_bucket": e * sizes["reduce_bucket"], "step": 8 * min(train, sizes["sub_group"]),
            "gather": e * sizes["gather"], "partition_elements": weights, "trainable_elements": train,
            "sub_group_elements": min(train, sizes["sub_group"])}


def activation_bytes(s: Shape, settings: Settings, micro: int) -> dict:
    """Per-rank bytes of one micro-batch's forward kept for backward, and of logits (module docstring)."""
    e = DTYPE_BYTES[settings.dtype]
    tokens = micro * (settings.prompt_length + settings.completion_length)
    images = prompts_per_micro_batch(micro, settings.num_generations) * settings.images_per_prompt
    patches = images * image_tokens(s, settings.max_pixels) * s.merge ** 2
    layer = llm_layer_bytes(s, e) * tokens
    ckpt = settings.gradient_checkpointing
    llm = (s.layers * e * s.hidden * tokens if ckpt else s.layers * layer) + llm_once_bytes(s, e) * tokens
    block = vision_block_bytes(s, e, sdpa=settings.attn_implementation == "sdpa")
    vision = 0 if settings.freeze_vision_tower or settings.lora_rank else \
        ((s.v_depth * e * s.v_hidden if ckpt else s.v_depth * block) + vision_once_bytes(s, e)) * patches
    width = settings.completion_length if settings.logits_length is None else settings.logits_length
    # model-dtype logits, the divided copy and its gradient; the fp32 rows logsumexp keeps; the entropy's two
    per_cell = 3 * e + (4 if e == 2 else 0) + (8 if settings.entropy_grad else 0)
    # backward: the layer being recomputed (with checkpointing), and the gradients in flight within a layer (SwiGLU's
    # three intermediate-wide ones and the hidden stream's in and out)
    working = (layer if ckpt else 0) + (3 * e * s.intermediate + 2 * e * s.hidden) * tokens
    return {"llm": llm, "vision": vision, "working": working,
            "logits": micro * width * s.vocab * per_cell + 8 * width * s.vocab,
            "tokens": tokens, "images": images, "patches": patches}


@dataclass
class Plan:
    name: str
    shape: Shape
    settings: Settings
    total_params: int
    trainable_params: int
    states: dict
    rows: list  # (label, {phase: bytes}); "vllm" rows depend on the GPU and are filled per GPU
    host: list  # (label, bytes per node, kind): held all along, or a save or --resume that comes and goes
    estimate: tuple  # DeepSpeed's (cpu bytes per node, gpu bytes, largest layer bytes)
    vllm_weights: int
    kv_per_token: int

    def host_peak(self) -> int:
        """While training: what is held, and the largest save on top (a --resume load comes before vLLM sleeps)."""
        return sum(n for _, n, kind in self.host if kind == "held") + \
            max(n for _, n, kind in self.host if kind == "save")

    def phases(self) -> list[str]:
        return self.settings.phases()

    def gpu_rows(self, gpu_bytes: int) -> list:
        util, asleep = self.settings.vllm_gpu_memory_utilization, self.settings.vllm_sleep_mode
        rows = list(self.rows)
        if util:
            vllm = util * gpu_bytes
            rows.append((f"vLLM: {util} x GPU (weights {gib(self.vllm_weights)}, KV cache <= "
                         f"{gib(vllm - self.vllm_weights)})", {p: vllm for p in self.phases()
                                                                if p == "rollout" or not asleep}))
        rows.append(("headroom (CUDA context, NCCL, fragmentation)",
                     {p: self.settings.headroom_gib * GIB for p in self.phases()}))
        return rows

    def totals(self, gpu_bytes: int) -> dict:
        rows = self.gpu_rows(gpu_bytes)
        return {p: sum(r.get(p, 0) for _, r in rows) for p in self.phases()}

    def problems(self, gpu_bytes: int) -> list[str]:
        totals, found = self.totals(gpu_bytes), []
        peak = max(totals, key=totals.get)
        if totals[peak] > gpu_bytes:
            found.append(f"the {peak} phase needs {gib(totals[peak])} GiB")
        util = self.settings.vllm_gpu_memory_utilization
        max_len = self.settings.prompt_length + self.settings.completion_length
        if util and util * gpu_bytes - self.vllm_weights < max_len * self.kv_per_token:
            found.append(f"vLLM's {util} x GPU cannot hold its weights and one {max_len}-token sequence")
        return found


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def make_plan(config: dict, settings: Settings, name: str = "model") -> Plan:
    if settings.attn_implementation not in ("flash_attention_2", "sdpa"):
        raise InputError(f"--attn-implementation {settings.attn_implementation}: the plan knows flash_attention_2 and "
                         "sdpa (eager attention also keeps every batch x heads x length^2 score)")
    s = shape_from_config(config)
    modules = parameter_modules(s)  # the base model: what vLLM, the reference and the final export hold
    adapters = lora_modules(s, settings.lora_rank, settings.lora_target_modules)
    trainable = adapters or [m for m in modules if not (settings.freeze_vision_tower and m[1] == "vision")]
    states = model_state_bytes(modules + adapters, trainable, settings)
    acts = activation_bytes(s, settings, settings.micro_batch_size)
    e, gpn = DTYPE_BYTES[settings.dtype], settings.gpus_per_node
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    total, largest = numel(modules), largest_layer(modules)
    estimate = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=gpn, num_nodes=settings.nodes, cpu_offload=settings.offload,
        cpu_offload_params=settings.offload, zero_init=True)
    always = lambda n: dict.fromkeys(settings.phases(), n)  # noqa: E731
    persisted = e * persisted_numel(modules + adapters, settings.param_persistence_threshold)  # kept when offloaded
    rows = [(f"policy weights, {settings.dtype} " + ("(offload: the persisted small ones)" if settings.offload
                                                     else "partition"),
             always(persisted if settings.offload else states["weights"]))]
    if not settings.offload:
        rows += [(f"policy gradients, {settings.dtype} partition", always(states["gradients"])),
                 ("fp32 master weights", always(states["master"])),
                 ("AdamW exp_avg + exp_avg_sq, fp32", always(states["adam"]))]
    rows.append(("ZeRO-3 reduce bucket", always(states["reduce_bucket"])))
    if settings.kl_coef > 0 and not adapters:  # zero3_inference_config: sharded, no optimizer
        rows.append(("reference model, " + ("offloaded: the persisted small ones" if settings.offload_reference
                                            else "partition"),
                     always(persisted if settings.offload_reference else states["weights"])))
    gathered = estimate[2] + states["gather"]  # + stage3_max_live_parameters and the prefetch bucket
    width = settings.completion_length if settings.logits_length is None else settings.logits_length
    rows += [(f"gathered layers (4 B x largest layer, {largest / 1e6:.0f}M)", {"update": gathered}),
             (f"activations, language model ({acts['tokens']} tokens)", {"update": acts["llm"]}),
             (f"activations, vision tower ({acts['images']} image(s), {acts['patches']} patches)",
              {"update": acts["vision"]}),
             ("backward: the layer recomputed, gradients within a layer", {"update": acts["working"]}),
             (f"logits ({settings.micro_batch_size} x {width} x {s.vocab})", {"update": acts["logits"]})]
    if not settings.offload:
        rows.append(("optimizer step: fp32 gradients + AdamW sqrt(v)", {"step": states["step"]}))
    if settings.hf_rollout_sequences:  # the fallback engine: an unsharded copy on every GPU, transformers' cache
        sequences, length = settings.hf_rollout_sequences, settings.prompt_length + settings.completion_length
        rows += [(f"transformers rollout engine: the policy's whole copy, {settings.dtype}", always(e * total)),
                 (f"transformers generate: KV cache of {sequences} sequences x {length} tokens",
                  {"rollout": sequences * length * 2 * s.layers * s.kv_heads * s.head_dim * e})]

    tp = settings.vllm_tensor_parallel_size
    vllm_weights = e * total // tp
    host = []
    if settings.offload:  # + the fp32 gradient buffers offload keeps, and AdamW's sqrt(v) at the step
        per_rank = states["weights"] + states["gradients"] + states["master"] + states["adam"] + \
            4 * states["trainable_elements"] + states["step"] // 2
        host.append(("offloaded weights, gradients, fp32 master and gradients, AdamW", gpn * per_rank, "held"))
    if settings.kl_coef > 0 and settings.offload_reference and not adapters:
        host.append(("offloaded reference weights", gpn * states["weights"], "held"))
    if settings.vllm_gpu_memory_utilization and settings.vllm_sleep_mode:
        host.append(("vLLM sleep: weights kept in pinned memory", gpn * vllm_weights, "held"))
    if not settings.offload:  # torch.save copies a GPU tensor to the CPU one storage at a time
        host.append(("DeepSpeed checkpoint save: one fp32 flat partition at a time",
                     gpn * 4 * states["sub_group_elements"], "save"))
    host.append(("final HF model, gathered on rank 0", e * total, "save"))
    host.append(("--resume: each rank loads its fp32 master + AdamW to CPU", gpn * 12 * states["trainable_elements"],
                 "resume"))
    return Plan(name=name, shape=s, settings=settings, total_params=total, trainable_params=numel(trainable),
                states=states, rows=rows, host=host, estimate=estimate, vllm_weights=vllm_weights,
                kv_per_token=2 * s.layers * s.kv_heads * s.head_dim * e // tp)


def largest_micro_batch(config: dict, settings: Settings, gpu_bytes: int, limit: int = 512) -> int:
    """The largest micro-batch whose plan fits (0: not even 1)."""
    best = 0
    for micro in range(1, limit + 1):
        if make_plan(config, replace(settings, micro_batch_size=micro)).problems(gpu_bytes):
            break
        best = micro
    return best


def format_plan(plan: Plan, config: dict, gpu: str = "80GB") -> str:
    s, st = plan.shape, plan.settings
    base = parameter_modules(s)
    parts = {p: numel(base, p) for p in ("vision", "language", "lm_head")}
    if st.lora_rank:
        trained = (f"LoRA r={st.lora_rank} on {','.join(st.lora_target_modules)}: "
                   f"{plan.trainable_params / 1e6:.1f}M trainable")
    else:
        trained = f"{plan.trainable_params / 1e9:.2f}B trainable"
    reference = "none"
    if st.kl_coef > 0 and st.lora_rank:  # what the reference row would be: it is the policy, adapters disabled
        copy = DTYPE_BYTES[st.dtype] * (partition_numel(base, st.world_size) +
                                        persisted_numel(base, st.param_persistence_threshold))
        reference = (f"the base model with the adapters disabled (KL {st.kl_coef}; no copy: {gib(copy)} GiB less "
                     "per GPU)")
    elif st.kl_coef > 0:
        reference = f"kept (KL {st.kl_coef})" + (", offloaded" if st.offload_reference else "")
    lines = [f"Memory plan: {plan.name} ({s.family}), {plan.total_params / 1e9:.2f}B parameters (vision "
             f"{parts['vision'] / 1e9:.2f}B, language {parts['language'] / 1e9:.2f}B, lm_head "
             f"{'tied' if s.tied else '%.2fB' % (parts['lm_head'] / 1e9)})",
             f"{st.world_size} GPUs ({st.gpus_per_node} per node x {st.nodes}), ZeRO-3 "
             f"{'with CPU offload' if st.offload else 'without offload'}, {st.dtype}, "
             f"{trained}, gradient checkpointing "
             f"{'on' if st.gradient_checkpointing else 'off'}, {st.attn_implementation}",
             f"micro-batch {st.micro_batch_size} x ({st.prompt_length} prompt + {st.completion_length} completion) "
             f"tokens; images <= {image_tokens(s, st.max_pixels)} tokens ({st.max_pixels} pixels)",
             "vLLM " + (f"{st.vllm_gpu_memory_utilization} of the GPU, sleep mode "
                        f"{'on' if st.vllm_sleep_mode else 'off'}" if st.vllm_gpu_memory_utilization else "off") +
             (f" (transformers generates {st.hf_rollout_sequences} sequences at once)" if st.hf_rollout_sequences
              else "") +
             f"; reference model {reference}", ""]
    phases = plan.phases()
    lines.append(f"{'per GPU (' + gpu + '), GiB':<70}" + "".join(f"{p:>9}" for p in phases))
    for label, values in plan.gpu_rows(GPUS[gpu]):
        lines.append(f"  {label:<68}" + "".join(f"{gib(values[p]) if p in values else '':>9}" for p in phases))
    totals = plan.totals(GPUS[gpu])
    lines.append(f"  {'total':<68}" + "".join(f"{gib(totals[p]):>9}" for p in phases))
    cpu, gpu_est, _ = plan.estimate
    lines += [f"DeepSpeed estimate_zero3_model_states_mem_needs: {gib(gpu_est)} GiB per GPU, {gib(cpu)} GiB host RAM "
              "per node (model states only" + (", every parameter trained as without LoRA)" if st.lora_rank else ")"),
              "", "host RAM per node, GiB"]
    lines += [f"  {label:<68}{gib(n):>9}" for label, n, _ in plan.host]
    lines.append(f"  {'peak while training (all but --resume, at the same time)':<68}{gib(plan.host_peak()):>9}")
    if st.vllm_gpu_memory_utilization:
        kv = st.vllm_gpu_memory_utilization * GPUS[gpu] - plan.vllm_weights
        lines.append(f"vLLM KV cache on {gpu}: <= {int(max(kv, 0) // plan.kv_per_token):,} tokens "
                     f"({plan.kv_per_token} B per token), less vLLM's profiled activations")
    lines += ["", "verdict"]
    for name, size in GPUS.items():
        problems = plan.problems(size)
        verdict = "fits" if not problems else "does NOT fit: " + "; ".join(problems)
        lines.append(f"  {name:>6} ({gib(size)} GiB): {verdict}; largest micro-batch that fits: "
                     f"{largest_micro_batch(config, st, size)}")
    return "\n".join(lines)


def settings_from_args(args, world_size: int, stage: int, gpus_per_node: int | None = None) -> Settings:
    """The plan of a step-1 or step-2 command line (its parsed flags), for `--plan`."""
    gpn = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    common = dict(gpus_per_node=gpn, nodes=max(world_size // gpn, 1), offload=args.offload,
                  micro_batch_size=args.micro_batch_size, max_pixels=args.max_pixels,
                  dtype="bfloat16" if args.dtype == "auto" else args.dtype,
                  gradient_checkpointing=args.gradient_checkpointing, freeze_vision_tower=args.freeze_vision_tower,
                  attn_implementation="flash_attention_2" if args.attn_implementation == "auto"
                  else args.attn_implementation, param_persistence_threshold=args.zero_param_persistence_threshold,
                  lora_rank=args.lora_rank, lora_target_modules=parse_targets(args.lora_target_modules))
    if stage == 1:
        return Settings.step1(prompt_length=args.max_length, **common)
    return Settings(prompt_length=args.max_prompt_length, completion_length=args.max_completion_length,
                    num_generations=args.num_generations, entropy_grad=args.entropy_coef > 0,
                    vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization if args.rollout_engine == "vllm"
                    else 0.0, vllm_sleep_mode=args.vllm_sleep_mode,
                    vllm_tensor_parallel_size=args.vllm_tensor_parallel_size,
                    hf_rollout_sequences=args.rollout_batch_size // world_size * args.num_generations
                    if args.rollout_engine == "hf" else 0, kl_coef=args.kl_coef,
                    offload_reference=args.offload_reference, **common)


def print_stage_plan(args, stage: int) -> None:
    """`--plan` of steps 1 and 2: the plan of this command line for the launcher's WORLD_SIZE and LOCAL_WORLD_SIZE,
    printed by rank 0. Only the model's config.json is read (a hub name: the shipped config of that name)."""
    settings = settings_from_args(args, int(os.environ.get("WORLD_SIZE", "1")), stage)
    if int(os.environ.get("RANK", "0")) == 0:
        name, config = load_config(args.model_path)
        print(format_plan(make_plan(config, settings, name), config), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Per-GPU and per-node memory of a step-1 or step-2 run under ZeRO-3, from the model's config.json "
                    "alone; verdicts for 40 / 80 / 141 GB GPUs and the largest micro-batch that fits. Defaults are "
                    "step 2's (--stage 1: step 1's). How to read it: docs/memory_plan.md")
    p.add_argument("--model", required=True,
                   help="a shipped config (qwen2.5-vl-3b-instruct, qwen2.5-vl-7b-instruct, qwen3-vl-4b-instruct, "
                        "qwen3-vl-8b-instruct), a config.json or a model folder")
    p.add_argument("--stage", type=int, choices=[1, 2], default=2, help="1: TRM SFT; 2: Trust-GRPO (default)")
    g = p.add_argument_group("cluster and ZeRO-3")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--offload", action="store_true", help="ZeRO-3 offload of parameters and optimizer to CPU")
    g.add_argument("--zero-param-persistence-threshold", type=int, default=10_000)
    g.add_argument("--headroom-gib", type=float, default=4.0,
                   help="added to every phase: CUDA context, NCCL buffers, allocator fragmentation")
    g.add_argument("--show-gpu", choices=list(GPUS), default="80GB", help="the GPU whose table is printed")
    g = p.add_argument_group("batch and model")
    g.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward pass, per rank")
    g.add_argument("--prompt-length", type=int, default=None,
                   help="tokens, images included (step 2: --max-prompt-length 4096; step 1: --max-length 8192)")
    g.add_argument("--completion-length", type=int, default=None, help="step 2: --max-completion-length 1024")
    g.add_argument("--logits-length", type=int, default=None,
                   help="positions whose logits are computed (default: the completion; step 1: 16, the target)")
    g.add_argument("--max-pixels", type=int, default=1003520)
    g.add_argument("--images-per-prompt", type=int, default=1)
    g.add_argument("--num-generations", type=int, default=None,
                   help="completions per prompt, which share its images (step 2: 8; step 1: 1)")
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--freeze-vision-tower", action="store_true")
    g.add_argument("--attn-implementation", choices=["flash_attention_2", "sdpa"], default="flash_attention_2")
    g.add_argument("--lora-rank", type=int, default=0, help="> 0: LoRA adapters of this rank train, not the model")
    g.add_argument("--lora-target-modules", default=",".join(LORA_TARGETS),
                   help="the language model's linear layers with adapters")
    g.add_argument("--entropy-coef", type=float, default=None, help="> 0: the entropy is differentiated (step 2: 1e-3)")
    g = p.add_argument_group("step 2: rollout and reference model")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=None, help="0: no vLLM (step 2: 0.4)")
    g.add_argument("--vllm-sleep-mode", action="store_true")
    g.add_argument("--vllm-tensor-parallel-size", type=int, default=1)
    g.add_argument("--kl-coef", type=float, default=None, help="> 0 keeps a reference model (step 2: 0.04)")
    g.add_argument("--offload-reference", action="store_true", help="the reference's partition in host memory")
    return p.parse_args(argv)


@exit_on_input_error
def main(argv=None):
    args = parse_args(argv)
    for name in ("gpus_per_node", "nodes", "micro_batch_size", "max_pixels", "vllm_tensor_parallel_size"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.lora_rank < 0:
        raise InputError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {args.lora_rank}")
    given = {k: v for k, v in dict(
        prompt_length=args.prompt_length, completion_length=args.completion_length, logits_length=args.logits_length,
        num_generations=args.num_generations, vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        kl_coef=args.kl_coef, entropy_grad=None if args.entropy_coef is None else args.entropy_coef > 0).items()
        if v is not None}
    settings = (Settings.step1 if args.stage == 1 else Settings)(
        gpus_per_node=args.gpus_per_node, nodes=args.nodes, offload=args.offload,
        micro_batch_size=args.micro_batch_size, max_pixels=args.max_pixels, images_per_prompt=args.images_per_prompt,
        dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
        freeze_vision_tower=args.freeze_vision_tower, attn_implementation=args.attn_implementation,
        vllm_sleep_mode=args.vllm_sleep_mode, vllm_tensor_parallel_size=args.vllm_tensor_parallel_size,
        offload_reference=args.offload_reference, param_persistence_threshold=args.zero_param_persistence_threshold,
        headroom_gib=args.headroom_gib, lora_rank=args.lora_rank,
        lora_target_modules=parse_targets(args.lora_target_modules), **given)
    if not 0 <= settings.vllm_gpu_memory_utilization < 1:
        raise InputError(f"--vllm-gpu-memory-utilization must be in [0, 1), got {settings.vllm_gpu_memory_utilization}")
    name, config = load_config(args.model)
    print(format_plan(make_plan(config, settings, name), config, args.show_gpu))


if __name__ == "__main__":
    main()
