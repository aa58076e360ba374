"""Peak GPU memory of step 2's passes against the memory plan (issue 18: validate the plan where a GPU is at hand).

    python demo/real_shaped_model.py --out TOK --tied            # here: the real vocabulary's tokenizer files
    python benchmarks/gpu_memory_plan.py --tokenizer-from TOK --out WORK        # on one GPU (~5 min on an H200)
    python benchmarks/gpu_memory_plan.py --tokenizer-from TOK --config TOK --out WORK --quick   # CPU: no peaks

The model: random-init weights of a shipped config (--config, default qwen2.5-vl-3b-instruct; --layers cuts its
decoder layers) with the tokenizer and processor files of --tokenizer-from. Each case runs in a process of its own
(the allocator starts empty), with step 2's own engines on 1 rank (step2_trust_grpo.policy.build_policy_engines:
the ZeRO-3 policy, AdamW, the ZeRO-3 reference) and one micro-batch: --micro-batch-size completions of one prompt
(one image of --pixels pixels and text; P tokens), each exactly C tokens. A first step allocates AdamW's states; the
second is measured from a reset peak per phase (torch.cuda.max_memory_allocated): the reference pass, the training
pass (forward and backward, the GRPO loss with KL and entropy), the optimizer step. The plan is
utils.memory_plan.make_plan of the same command line (settings_from_args) with P and C as its lengths, its totals
less its headroom row (CUDA context and fragmentation, which max_memory_allocated does not count).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import torch

from sophiavl.utils.cli import InputError, exit_on_input_error

CASES = "0:2:512,1:4:1024,1:8:1024"  # gradient checkpointing : micro-batch : completion tokens
PHASES = ("reference", "update", "step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-from", required=True, help="a model folder with the tokenizer and processor files")
    p.add_argument("--config", default="qwen2.5-vl-3b-instruct",
                   help="a shipped config (utils/model_configs), a config.json or a model folder")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's)")
    p.add_argument("--out", required=True)
    p.add_argument("--cases", default=CASES, help="gradient checkpointing (0/1):micro-batch:completion tokens, ...")
    p.add_argument("--pixels", type=int, default=1003520, help="the image's pixels, also --max-pixels")
    p.add_argument("--prompt-words", type=int, default=150)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--attn-implementation", default="auto")
    p.add_argument("--quick", action="store_true", help="a CPU run of the same passes (no peaks)")
    p.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # one case, in its own process
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    try:
        args.case_list = [tuple(int(x) for x in case.split(":")) for case in args.cases.split(",")]
        assert all(len(case) == 3 for case in args.case_list)
    except (ValueError, AssertionError):
        p.error(f"--cases {args.cases}: expected checkpointing:micro-batch:completion, e.g. {CASES}")
    return args


def build_model(args) -> str:
    """WORK/model: random-init weights of --config in --dtype, with --tokenizer-from's other files."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from sophiavl.utils.memory_plan import load_config

    folder = os.path.join(args.out, "model")
    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")) or \
            os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(args.tokenizer_from):
        if not name.startswith(("model", "config")) and os.path.isfile(os.path.join(args.tokenizer_from, name)):
            shutil.copy(os.path.join(args.tokenizer_from, name), folder)
    _, config = load_config(args.config)
    if args.layers:
        for section in (config, config.get("text_config", {})):
            section["num_hidden_layers"] = args.layers
            section["max_window_layers"] = min(section.get("max_window_layers", args.layers), args.layers)
            section.pop("layer_types", None)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder),
                                                        dtype=getattr(torch, args.dtype))
    model.save_pretrained(folder)
    del model
    return folder


def step2_args(args, model: str, checkpointing: int, micro: int, completion: int):
    """Step 2's parsed command line for this case: 1 prompt x `micro` completions per step (one micro-batch)."""
    from step2_trust_grpo.arguments import parse_args as parse_step2

    return parse_step2([
        "--model-path", model, "--registry", "unused.json", "--data-path", "unused",
        "--output-dir", os.path.join(args.out, "unused"), "--rollout-engine", "hf",
        "--num-generations", str(micro), "--rollout-batch-size", "1", "--micro-batch-size", str(micro),
        "--max-completion-length", str(completion), "--min-pixels", "3136", "--max-pixels", str(args.pixels),
        "--dtype", args.dtype, "--attn-implementation", args.attn_implementation,
        *(["--gradient-checkpointing"] if checkpointing else [])])


def micro_batch(processor, micro: int, completion: int, pixels: int, words: int) -> dict:
    """`micro` completions of one prompt (one image, `words` words), each `completion` random non-special tokens."""
    from PIL import Image

    from sophiavl.utils.prompts import policy_messages
    from step2_trust_grpo.policy import completion_batch

    cells = pixels // 28 ** 2  # 28 x 28 pixels per merged token: sides the processor keeps as they are
    rows = max(d for d in range(1, int(cells ** 0.5) + 1) if cells % d == 0)
    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (28 * rows, 28 * cells // rows, 3), generator=generator,
                                          dtype=torch.uint8).numpy())
    chat = policy_messages(" ".join(["word"] * words) + " How many?", "numerical", None, 1)
    ids = torch.randint(0, min(processor.tokenizer.vocab_size, 150_000), (micro, completion), generator=generator)
    return completion_batch(processor, [chat] * micro, [[image]] * micro, ids.tolist())


def run_case(args) -> dict:
    """One case in this process: its engines, two steps, the second's peaks; the plan of its command line."""
    from sophiavl.utils.distributed import init_distributed
    from sophiavl.utils.memory_plan import load_config, make_plan, settings_from_args
    from sophiavl.utils.model import load_processor, resolve_attn_implementation, resolve_dtype
    from step2_trust_grpo.loss import grpo_loss
    from step2_trust_grpo.policy import build_policy_engines, completion_logps

    checkpointing, micro, completion = args.case_list[args.case]
    model = os.path.join(args.out, "model")
    s2 = step2_args(args, model, checkpointing, micro, completion)
    init_distributed(10)
    processor = load_processor(model, s2.min_pixels, s2.max_pixels)
    batch = micro_batch(processor, micro, completion, args.pixels, args.prompt_words)
    prompt = batch["input_ids"].shape[1] - completion
    engine, reference = build_policy_engines(s2, 1, resolve_dtype(s2.dtype))
    gpu = torch.cuda.is_available()
    advantages = torch.linspace(-1, 1, micro)
    peaks = {}
    for step in (1, 2):
        for phase in PHASES:
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if phase == "reference":
                engine.eval()
                with torch.no_grad():
                    ref_logps = completion_logps(reference, batch, s2.temperature)[0]
            elif phase == "update":
                engine.train()
                logps, entropy = completion_logps(engine, batch, s2.temperature, with_entropy=True)
                mask = batch["completion_mask"].to(logps.device)
                loss, _ = grpo_loss(logps, logps.detach(), ref_logps, advantages.to(logps.device), mask,
                                    kl_coef=s2.kl_coef, entropy_coef=s2.entropy_coef, entropy=entropy,
                                    loss_agg=s2.loss_agg)
                engine.backward(loss)
            else:
                engine.step()
            if gpu:
                torch.cuda.synchronize()
                peaks[phase] = torch.cuda.max_memory_allocated()
        resident = torch.cuda.memory_allocated() if gpu else None
    settings = replace(settings_from_args(s2, 1, stage=2, gpus_per_node=1), prompt_length=prompt,
                       attn_implementation=resolve_attn_implementation(s2.attn_implementation),
                       hf_rollout_sequences=0)  # no rollout engine here: the trainer's phases only
    name, config = load_config(model)
    plan = make_plan(config, settings, name)
    headroom = settings.headroom_gib * 2 ** 30
    planned = {phase: total - headroom for phase, total in plan.totals(0).items()}
    always = sum(r["step"] for _, r in plan.rows if "step" in r and "update" in r)  # held in every phase
    return {"checkpointing": bool(checkpointing), "micro_batch_size": micro, "prompt_tokens": prompt,
            "completion_tokens": completion, "attn_implementation": settings.attn_implementation,
            "loss": loss.item(), "measured": peaks or None, "resident_after_step": resident,
            "planned": planned, "planned_resident": always}


def report(results: list[dict], device: str) -> str:
    gib = lambda n: f"{n / 2 ** 30:.2f}" if n is not None else "-"  # noqa: E731
    lines = [f"device: {device}", "", "| checkpointing | micro | P + C tokens | phase | planned GiB | measured GiB | "
             "plan error |", "|---|---|---|---|---|---|---|"]
    for r in results:
        shape = f"{r['checkpointing']} | {r['micro_batch_size']} | {r['prompt_tokens']} + {r['completion_tokens']}"
        rows = [("resident after a step", r["planned_resident"], r["resident_after_step"])]
        rows += [(phase, r["planned"][phase], (r["measured"] or {}).get(phase)) for phase in ("update", "step")]
        for phase, planned, measured in rows:
            error = f"{(planned - measured) / measured:+.1%}" if measured else "-"
            lines.append(f"| {shape} | {phase} | {gib(planned)} | {gib(measured)} | {error} |")
    return "\n".join(lines)


@exit_on_input_error
def main(argv=None):
    args = parse_args(argv)
    if args.case is not None:
        print("CASE " + json.dumps(run_case(args)), flush=True)
        return 0
    if not torch.cuda.is_available() and not args.quick:
        raise InputError("no GPU here: this measures torch.cuda.max_memory_allocated (--quick runs the passes on CPU)")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    build_model(args)
    print(f"model built in {time.time() - t0:.0f} s", flush=True)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")}
    results = []
    for k in range(len(args.case_list)):
        t = time.time()
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--case", str(k)],
                              env=env, capture_output=True, text=True)
        found = [line[5:] for line in done.stdout.splitlines() if line.startswith("CASE ")]
        if done.returncode or not found:
            raise InputError(f"case {args.case_list[k]} failed (exit {done.returncode}): "
                             + (done.stdout + done.stderr)[-3000:])
        results.append(json.loads(found[0]))
        print(f"case {args.case_list[k]}: {time.time() - t:.0f} s", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no peaks)"
    table = report(results, device)
    print(table, flush=True)
    with open(os.path.join(args.out, "gpu_memory_plan.json"), "w") as f:
        json.dump({"device": device, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
