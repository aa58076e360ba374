"""TRL 1.16's GRPO loss (GRPOTrainer._compute_loss), run on given tensors. Importing trl costs ~20 s of CPU here
(it pulls in vLLM), so the method's source is read from the installed package and compiled alone, with the
trainer attributes it reads as plain values: the code that runs is TRL's, line for line."""
import ast
import functools
import importlib.metadata
import importlib.util
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch


def _functions(path: str, names: dict) -> dict:
    """{name: function} compiled from `path`; names maps a function name to its class (None: module level)."""
    tree = ast.parse(open(path).read())
    found = {}
    for node in tree.body:
        bodies = [(node, None)] if isinstance(node, ast.FunctionDef) else \
            [(child, node.name) for child in node.body if isinstance(child, ast.FunctionDef)] \
            if isinstance(node, ast.ClassDef) else []
        for fn, owner in bodies:
            if fn.name in names and names[fn.name] == owner:
                fn.decorator_list = []
                found[fn.name] = fn
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=list(found.values()), type_ignores=[]), path, "exec"), namespace)
    return {name: namespace[name] for name in found}


@functools.cache
def trl_compute_loss():
    """TRL's _compute_loss(self, model, inputs), or a skip when trl 1.16 is not installed
    (`pip install -r benchmarks/requirements.txt`)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or importlib.metadata.version("trl") != "1.16.0":
        pytest.skip("needs trl 1.16.0 (pip install -r benchmarks/requirements.txt)")
    root = spec.submodule_search_locations[0]
    helpers = _functions(os.path.join(root, "trainer", "utils.py"), {"nanmin": None, "nanmax": None})
    method = _functions(os.path.join(root, "trainer", "grpo_trainer.py"), {"_compute_loss": "GRPOTrainer"})
    method["_compute_loss"].__globals__.update(helpers)
    return method["_compute_loss"]


def trl_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type, beta=0.0, epsilon_low=0.2,
             epsilon_high=0.2, importance_sampling_level="token", importance_sampling_ratio=None,
             max_completion_length=None, num_items_in_batch=None, gradient_accumulation_steps=1):
    """(loss, d loss / d logps, TRL's logged metrics) for one micro-batch on one process, no entropy bonus."""
    leaf = logps.detach().clone().requires_grad_()
    batch, width = logps.shape

    def per_token_logps_and_entropies(*_, **__):
        return leaf, torch.zeros_like(leaf), None

    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level=importance_sampling_level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None,
                             steps_per_generation=gradient_accumulation_steps),
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        use_vllm=importance_sampling_ratio is not None,
        vllm_importance_sampling_correction=importance_sampling_ratio is not None,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=gradient_accumulation_steps,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(batch, 0, dtype=torch.long), "prompt_mask": torch.zeros(batch, 0),
              "completion_ids": torch.zeros(batch, width, dtype=torch.long), "completion_mask": mask.float(),
              "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
              "importance_sampling_ratio": importance_sampling_ratio,
              "num_items_in_batch": torch.tensor(float(num_items_in_batch or 0))}
    loss = trl_compute_loss()(trainer, None, inputs)
    loss.backward()
    return loss.item(), leaf.grad, {k: v[-1] for k, v in trainer._metrics["train"].items()}
