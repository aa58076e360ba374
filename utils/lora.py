"""LoRA adapters (peft) on the language model of the trained policy or TRM (steps 1 and 2), under ZeRO-3.

The model is loaded sharded as for full fine-tuning (HfDeepSpeedConfig), then peft injects its adapters in place: each
target Linear becomes a peft LoraLayer holding the frozen `base_layer` and the trainable `lora_A` / `lora_B`, created
outside zero.Init, whole on every rank. `deepspeed.initialize` partitions them like every other parameter (ZeRO-3
converts the parameters it finds unpartitioned, broadcasting rank 0's values first). The engine keeps the transformers
model itself (not peft's PeftModel wrapper), so everything that reads `engine.module` works as without LoRA.

Outside the trainer the adapters do not exist: `utils.zero3.gathered_weights` streams each LoRA layer as the merged
W + (alpha / r) B A under its base name (the rollout engines and the final HF export get a plain Qwen-VL), and
`write_adapter` writes the adapter alone in peft's format.
"""
import copy
import os
import re

import torch

from sophiavl.utils.cli import InputError

# The language model's linear layers. Not the vision tower's: Qwen2.5-VL's vision MLP reuses the names gate_proj,
# up_proj and down_proj, so bare names would adapt it too (LoRA recipes for Qwen-VL leave the tower as it is); not
# lm_head or the embeddings (vocabulary-wide, and tied to each other in the 3B / 4B models).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LANGUAGE_MODEL = "model.language_model."  # transformers' module path of every supported family's decoder
ADAPTER_DIR = "adapter"  # --lora-save-adapter: final/adapter/


def target_regex(targets) -> str:
    """peft's target_modules as one regex (peft full-matches it against module names): the named linear layers of the
    language model, and nothing of the vision tower."""
    return re.escape(LANGUAGE_MODEL) + r".*\.(" + "|".join(re.escape(t) for t in targets) + ")"


def parse_targets(value: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    if not targets:
        raise InputError("--lora-target-modules: give one or more module names, comma-separated (e.g. q_proj,v_proj)")
    return targets


def add_adapters(model, args, seed: int):
    """Inject LoRA adapters into `model` in place (--lora-rank r, --lora-alpha, --lora-dropout on
    --lora-target-modules of the language model) and freeze everything else. Returns peft's PeftModel around the same
    modules (its disable_adapter() gives the base model), or None with --lora-rank 0. A target name that matches no
    linear layer of the language model is a one-line error that lists the names there are."""
    if not args.lora_rank:
        return None
    from peft import LoraConfig, get_peft_model

    targets = parse_targets(args.lora_target_modules)
    linear = [name for name, module in model.named_modules()
              if name.startswith(LANGUAGE_MODEL) and isinstance(module, torch.nn.Linear)]
    found = {name.rsplit(".", 1)[-1] for name in linear}
    missing = [t for t in targets if t not in found]
    if missing:
        raise InputError(f"--lora-target-modules {','.join(missing)}: no linear layer of that name in the language "
                         f"model of {args.model_path} (it has {', '.join(sorted(found))})")
    torch.manual_seed(seed)  # lora_A's initialisation (lora_B starts at zero: the policy starts as the base model)
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=target_regex(targets), bias="none")
    return get_peft_model(model, config)


def lora_layers(module) -> dict:
    """{module name: peft LoraLayer} of every adapted layer in `module`."""
    if not any(".lora_A." in name for name, _ in module.named_parameters()):
        return {}  # full fine-tuning: no peft import on the weight-sync path
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


def base_name(name: str) -> str:
    """A LoRA layer's parameter name as the plain model names it: `x.q_proj.base_layer.weight` -> `x.q_proj.weight`."""
    return name.replace(".base_layer.", ".")


def layer_of(name: str, layers: dict) -> str | None:
    """The LoRA layer a parameter belongs to (its base weight and bias, its lora_A and lora_B), None for the others."""
    for marker in (".base_layer.", ".lora_A.", ".lora_B."):
        if marker in name and name.split(marker)[0] in layers:
            return name.split(marker)[0]
    return None


def merged_weight(layer) -> torch.Tensor:
    """W + scaling x B A of a LoRA layer whose parameters are gathered, computed apart (peft's own delta,
    get_delta_weight): the layer's weights are not touched, so nothing drifts as merge/unmerge in place would."""
    if layer.merged:
        raise RuntimeError("a LoRA layer was merged in place: its weight already holds the adapter")
    weight = layer.get_base_layer().weight.detach().clone()
    for adapter in layer.active_adapters:
        weight += layer.get_delta_weight(adapter)
    return weight


def adapter_tensors(module, params_per_gather: int = 16):
    """Yield (name in peft's saved format, full tensor) of every adapter matrix, gathered a few at a time (a
    collective: every rank must consume it)."""
    import deepspeed

    named = [(n, p) for n, p in module.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    for start in range(0, len(named), params_per_gather):
        chunk = named[start:start + params_per_gather]
        with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
            for name, param in chunk:
                adapter = name.split(".lora_")[1].split(".")[1]  # lora_A.<adapter>.weight
                yield "base_model.model." + name.replace(f".{adapter}.", "."), param.data.detach().clone()


def write_adapter(module, state: dict, path: str, base_model: str) -> None:
    """The adapter alone (`state`: adapter_tensors' output), as peft's save_pretrained writes it: adapter_config.json
    and adapter_model.safetensors, which PeftModel.from_pretrained loads onto the base model."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = copy.copy(module.peft_config["default"])  # peft copies its config onto the model it adapts
    config.base_model_name_or_path, config.inference_mode = base_model, True
    config.save_pretrained(path)
    save_file({name: t.cpu().contiguous() for name, t in state.items()},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
