"""Run under `deepspeed --num_gpus 2`: after one optimizer step and a weight sync, the colocated
vLLM engine must decode greedily exactly what the HF policy with the same weights decodes (fp32).
Prints `SYNC-OK rank R changed=K/N` on success; any mismatch raises."""
import argparse

import deepspeed
import torch
from transformers.integrations import HfDeepSpeedConfig

from step2_trust_grpo.policy import completion_batch, completion_logps
from step2_trust_grpo.rollout import HFRollout, VLLMRollout
from sophiavl.utils.generation import Sampling
from sophiavl.utils.data import load_rows, open_images
from sophiavl.utils.distributed import init_distributed
from sophiavl.utils.ds_config import zero3_train_config
from sophiavl.utils.model import load_model, load_processor
from sophiavl.utils.prompts import policy_messages

parser = argparse.ArgumentParser()
parser.add_argument("--model-path", required=True)
parser.add_argument("--registry", required=True)
parser.add_argument("--local_rank", type=int, default=-1)
args = parser.parse_args()

rank, _ = init_distributed()
processor = load_processor(args.model_path)
rows = load_rows("tiny_test", args.registry)[rank * 6:(rank + 1) * 6]
images = [open_images(r) for r in rows]
chats = [policy_messages(r["prompt"], r["problem_type"], r["options"], len(i)) for r, i in zip(rows, images)]

plain = load_model(args.model_path, torch.float32)  # before HfDeepSpeedConfig: a plain, unsharded copy
config = zero3_train_config(micro_batch_size=len(rows), gradient_accumulation_steps=1, world_size=2, bf16=False,
                            param_persistence_threshold=0)
hf_ds_config = HfDeepSpeedConfig(config)
policy = load_model(args.model_path, torch.float32, hf_ds_config=hf_ds_config)
optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-2)
engine, *_ = deepspeed.initialize(model=policy, optimizer=optimizer, config=config)
sampling = Sampling(max_new_tokens=12, temperature=1.0)
rollout = VLLMRollout(args.model_path, processor, sampling, seed=rank,
                      max_model_len=1024, max_images=1, dtype="float32", gpu_memory_utilization=0.5,
                      tensor_parallel_size=1, sleep_mode=False)
before = rollout.generate(chats, images, 1, greedy=True).token_ids

# one large update so that the greedy decodes change
targets = [processor.tokenizer.encode("<think>ok</think><answer>A</answer>")] * len(rows)
logps, _ = completion_logps(engine, completion_batch(processor, chats, images, targets), temperature=1.0)
engine.backward(-logps.mean())
engine.step()

rollout.sync_weights(engine.module)
after = rollout.generate(chats, images, 1, greedy=True).token_ids
reference = HFRollout(plain, processor, sampling)
reference.sync_weights(engine.module)
expected = reference.generate(chats, images, 1, greedy=True).token_ids

assert after == expected, f"rank {rank}: vLLM after sync {after} != HF {expected}"
changed = sum(a != b for a, b in zip(after, before))
assert changed > 0, f"rank {rank}: the update changed no greedy decode; the check would prove nothing"
print(f"SYNC-OK rank {rank} changed={changed}/{len(rows)}", flush=True)
