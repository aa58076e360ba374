"""Run under `deepspeed --num_gpus 2`: with --loss-agg token-mean-global the gradient DeepSpeed's ZeRO-3 applies
over a step (2 ranks x 2 micro-batches of very different token counts) is that of (sum over every completion
token of the step) / (their number), computed here in one piece (the per-micro-batch token-mean's differs).
Uses the functions step 2's update_policy uses. Prints `GLOBAL-OK rank R` on success; a mismatch raises."""
import argparse

import deepspeed
import torch

from step2_trust_grpo.loss import masked_aggregate, step_denominator, step_units
from sophiavl.utils.distributed import init_distributed, shutdown, sum_across_ranks
from sophiavl.utils.ds_config import zero3_train_config

parser = argparse.ArgumentParser()
parser.add_argument("--model-path")  # given by the test helper, unused
parser.add_argument("--registry")
parser.add_argument("--local_rank", type=int, default=-1)
args = parser.parse_args()

rank, world_size = init_distributed()
g = torch.Generator().manual_seed(0)
features = torch.randn(world_size, 2, 2, 4, 3, generator=g)  # rank, micro-batch, sequence, token, feature
lengths = torch.tensor([[[4, 1], [1, 0]], [[4, 4], [3, 4]]])  # 6, 1 | 8, 7 completion tokens
masks = torch.arange(4)[None, None, None, :] < lengths[..., None]
w0 = torch.randn(3, generator=g)


def weight_step(loss_agg: str) -> torch.Tensor:
    """One optimizer step of plain SGD (lr 1, no clipping): returns w0 - w, the gradient DeepSpeed applied."""
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0[None])
    config = zero3_train_config(micro_batch_size=2, gradient_accumulation_steps=2, world_size=world_size, bf16=False,
                                gradient_clipping=0.0, param_persistence_threshold=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=config)
    units = sum(step_units(loss_agg, masks[rank, m], 99) for m in range(2))
    denominator = step_denominator(sum_across_ranks(units)[0], 2, world_size) if loss_agg == "token-mean-global" \
        else None
    for m in range(2):
        values = engine(features[rank, m]).squeeze(-1)  # a per-token "loss" linear in w
        engine.backward(masked_aggregate(values, masks[rank, m], loss_agg, denominator))
        engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        return w0 - engine.module.weight.detach().clone()[0]


expected = (features * masks[..., None]).sum(dim=(0, 1, 2, 3)) / masks.sum()
applied = weight_step("token-mean-global")
torch.testing.assert_close(applied, expected, rtol=1e-5, atol=1e-6)
# what the per-micro-batch token-mean would have applied: the mean over micro-batches and ranks of their means
per_micro_batch = ((features * masks[..., None]).sum(dim=(2, 3)) / masks.sum(dim=(2, 3))[..., None]).mean(dim=(0, 1))
assert not torch.allclose(per_micro_batch, expected, rtol=1e-2), "the check cannot tell the aggregations apart"
print(f"GLOBAL-OK rank {rank} applied={applied.tolist()} expected={expected.tolist()}", flush=True)
shutdown()
