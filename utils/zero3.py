"""ZeRO-3 state shared by steps 1 and 2: streaming gathered weights, checkpoints that resume, and the
final model as an HF directory.

Resume needs no saved RNG or sampler state: both steps derive data order and seeds from the step.
"""
import os
import re
import shutil
import sys
import time

import torch

CHECKPOINTS = "checkpoints"


def gathered_weights(module, params_per_gather: int = 16):
    """Yield (name, full tensor) for every weight of a ZeRO-3 module as transformers and vLLM name them, gathering
    only about `params_per_gather` parameters at a time, never the whole model. A LoRA layer (utils/lora.py) comes
    out merged, W + (alpha / r) B A under its base name, its base weight, bias and adapter gathered together; no
    adapter matrix is yielded. A generator, so a consumer (vLLM's reload) pulls tensors lazily. Every rank must
    consume it to the end, in the same order: each gather is a collective."""
    import deepspeed

    from sophiavl.utils.lora import base_name, layer_of, lora_layers, merged_weight

    layers = lora_layers(module)
    units = {}  # a LoRA layer's parameters, or one other parameter, in the order of named_parameters
    for name, param in module.named_parameters():
        units.setdefault(layer_of(name, layers) or name, []).append((name, param))
    for chunk in _chunks(list(units.items()), params_per_gather):
        # one flat GatheredParameters per chunk: nesting them re-shards the outer ones early
        with deepspeed.zero.GatheredParameters([p for _, named in chunk for _, p in named], modifier_rank=None):
            for unit, named in chunk:
                if unit in layers:
                    yield f"{unit}.weight", merged_weight(layers[unit])
                    yield from ((base_name(n), p.data.detach().clone()) for n, p in named
                                if n.endswith(".base_layer.bias"))
                else:
                    yield from ((n, p.data.detach().clone()) for n, p in named)


def _chunks(units: list, size: int):
    """Consecutive units (key, [(name, param)]) in chunks of at most `size` parameters; a unit is never split."""
    chunk, count = [], 0
    for unit in units:
        if chunk and count + len(unit[1]) > size:
            yield chunk
            chunk, count = [], 0
        chunk.append(unit)
        count += len(unit[1])
    if chunk:
        yield chunk


def save_checkpoint(engine, output_dir: str, step: int, keep_last: int = 2) -> None:
    """Every rank writes its part of the tag directory; only then does rank 0 point `latest` at it, by an
    atomic rename. A crash at any moment of a save leaves `latest` on the previous, complete checkpoint.
    (DeepSpeed's own `latest` is written by rank 0 before the other ranks have finished, and in place.)"""
    root = os.path.join(output_dir, CHECKPOINTS)
    engine.save_checkpoint(root, tag=f"step{step}", client_state={"step": step}, save_latest=False)
    torch.distributed.barrier()
    _pause_for_tests(step)
    if torch.distributed.get_rank() == 0:
        tmp = os.path.join(root, f"latest.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(f"step{step}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, "latest"))
        # only older tags are pruned: a newer one is a half-written leftover of a crashed run, redone later
        tags = sorted((d for d in os.listdir(root) if re.fullmatch(r"step\d+", d) and int(d[4:]) <= step),
                      key=lambda d: int(d[4:]))
        for old in tags[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    torch.distributed.barrier()


def _pause_for_tests(step: int) -> None:
    """SOPHIAVL_PAUSE_IN_SAVE=<step>: stop between the tag directory and the `latest` pointer, so a test can
    kill the run at that exact moment."""
    if os.environ.get("SOPHIAVL_PAUSE_IN_SAVE") == str(step):
        print(f"SOPHIAVL_PAUSE_IN_SAVE: rank {torch.distributed.get_rank()} paused in the save of step {step}",
              file=sys.stderr, flush=True)
        time.sleep(600)


def load_checkpoint(engine, output_dir: str) -> int:
    """Load the latest checkpoint into the engine (model, optimizer, scheduler); return its step, 0 if none."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.exists(os.path.join(root, "latest")):
        return 0
    _, client_state = engine.load_checkpoint(root)
    return int(client_state["step"])


def save_hf_model(engine, processor, path: str, adapter_of: str | None = None) -> None:
    """Gather the ZeRO-3 weights a few at a time into rank 0's CPU memory and save an HF directory
    (model + processor) that transformers, evaluation and `vllm serve` load directly; a LoRA model's merged (see
    gathered_weights). `adapter_of` (the base model's path): the adapter alone in path/adapter too (utils/lora.py).
    Written to a temporary directory and renamed, so `path` is either the old or the new model, never half."""
    from sophiavl.utils.lora import ADAPTER_DIR, adapter_tensors, write_adapter

    rank = torch.distributed.get_rank()
    engine.empty_partition_cache()  # parameters a prefetch left in flight could not be re-partitioned below
    state = {}
    for name, tensor in gathered_weights(engine.module):
        if rank == 0:
            state[name] = tensor.cpu()
    adapter = dict(adapter_tensors(engine.module)) if adapter_of else None  # every rank gathers
    if rank == 0:
        tmp = f"{path}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        processor.save_pretrained(tmp)
        if adapter is not None:
            write_adapter(engine.module, adapter, os.path.join(tmp, ADAPTER_DIR), adapter_of)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    torch.distributed.barrier()
