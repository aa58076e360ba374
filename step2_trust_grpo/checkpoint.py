"""Checkpoints that resume exactly, and the final policy as an HF directory.

Resume needs no saved RNG state: every step re-seeds from (seed, step, rank), so step k draws the
same samples whether or not the run was interrupted before it. Data order is a function of the step.
"""
import os
import re
import shutil
import sys
import time

import torch

from step2_trust_grpo.rollout import gathered_weights

CHECKPOINTS = "checkpoints"


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


def save_hf_model(engine, processor, path: str) -> None:
    """Gather the ZeRO-3 weights a few at a time into rank 0's CPU memory and save an HF directory
    (model + processor) that transformers, step 3 and `vllm serve` load directly. Written to a
    temporary directory and renamed, so `path` is either the old or the new model, never half."""
    rank = torch.distributed.get_rank()
    state = {}
    for name, tensor in gathered_weights(engine.module):
        if rank == 0:
            state[name] = tensor.cpu()
    if rank == 0:
        tmp = f"{path}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        processor.save_pretrained(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    torch.distributed.barrier()
