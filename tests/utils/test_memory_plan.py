"""The memory plan's numbers: parameter counts against real models and the public totals, ZeRO-3 partitions against a
real single-process engine (gloo), the activation and logits formulas against the bytes autograd saves, and the CLI."""
import json
import math
import os
import types

import deepspeed
import pytest
import torch
import transformers
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params

from sophiavl.demo.real_shaped_model import VISION_CONFIG, release_config
from sophiavl.utils import memory_plan as mp
from sophiavl.utils.ds_config import zero3_train_config

# Parameters of the releases: what transformers builds from each config.json (safetensors totals on the Hub:
# Qwen2.5-VL-7B 8.29B, -3B 3.75B; Qwen3-VL-8B 8,767,123,696 and -4B 4,437,815,808 by the Hub's API).
PUBLIC_TOTALS = {"qwen2.5-vl-7b-instruct": 8_292_166_656, "qwen2.5-vl-3b-instruct": 3_754_622_976,
                 "qwen3-vl-8b-instruct": 8_767_123_696, "qwen3-vl-4b-instruct": 4_437_815_808}
QWEN3_TINY = {  # the Qwen3-VL layout at tiny widths; the image placeholder ids need the real vocabulary
    "model_type": "qwen3_vl", "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False,
    "text_config": {"head_dim": 64, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 152000, "rope_theta": 5000000,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [12, 10, 10], "rope_type": "default"}},
    "vision_config": {"deepstack_visual_indexes": [0], "depth": 2, "hidden_act": "gelu_pytorch_tanh",
                      "hidden_size": 128, "intermediate_size": 320, "num_heads": 2, "num_position_embeddings": 256,
                      "out_hidden_size": 256, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}}


def qwen25_tiny(tied=False) -> dict:
    """The release's layout (demo/real_shaped_model.py) with widths where every activation term is visible."""
    config = release_config(tied)
    text = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]})
    config.update(text)
    config["text_config"].update(text)
    config["vision_config"] = dict(VISION_CONFIG, hidden_size=128, intermediate_size=320, num_heads=2,
                                   out_hidden_size=256)
    return config


def build(config: dict, dtype=torch.float32, device=None):
    config_class = transformers.Qwen3VLConfig if config["model_type"] == "qwen3_vl" else transformers.Qwen2_5_VLConfig
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = transformers.AutoModelForImageTextToText.from_config(config_class.from_dict(config),
                                                                     attn_implementation="sdpa")
    return model.to(dtype)


def unique_params(model) -> list:
    return list({id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("name", sorted(PUBLIC_TOTALS))
def test_shipped_configs_count_the_release_parameters(name):
    _, config = mp.load_config(name)
    modules = mp.parameter_modules(mp.shape_from_config(config))
    model = build(config, device="meta")  # transformers reads the shipped file as the release
    assert mp.numel(modules) == sum(p.numel() for p in unique_params(model)) == PUBLIC_TOTALS[name]
    assert mp.largest_layer(modules) == model_to_params(model)[1]  # (its total needs real storage: meta has none)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == name.endswith(("3b-instruct", "4b-instruct"))  # 3B and 4B tie lm_head, 7B and 8B do not
    assert mp.numel(modules, "lm_head") == (0 if tied else config.get("text_config", config)["vocab_size"] *
                                           config.get("text_config", config)["hidden_size"])


def test_qwen25_configs_keep_the_release_layout():
    for name, tied in [("qwen2.5-vl-7b-instruct", False), ("qwen2.5-vl-3b-instruct", True)]:
        _, config = mp.load_config(f"Qwen/{name.replace('qwen2.5-vl', 'Qwen2.5-VL').replace('instruct', 'Instruct')}")
        assert set(config) == set(release_config(tied))
        assert config["vocab_size"] == (151936 if tied else 152064) and config["tie_word_embeddings"] is tied


@pytest.mark.parametrize("config", [qwen25_tiny(False), qwen25_tiny(True), QWEN3_TINY], ids=["untied", "tied", "qwen3"])
def test_counts_and_partitions_equal_the_real_tensors(config):
    modules = mp.parameter_modules(mp.shape_from_config(config))
    model = build(config)
    params = unique_params(model)
    assert mp.numel(modules) == sum(p.numel() for p in params)
    assert (mp.numel(modules), mp.largest_layer(modules)) == model_to_params(model)  # DeepSpeed's own count
    for ranks in (1, 2, 3, 8, 16):  # DeepSpeed: (numel + padding to a multiple of ranks) // ranks per tensor
        assert mp.partition_numel(modules, ranks) == sum(math.ceil(p.numel() / ranks) for p in params)
    assert mp.persisted_numel(modules, 10_000) == sum(p.numel() for p in params if p.numel() <= 10_000)
    assert mp.numel(modules, "vision") == sum(p.numel() for p in model.model.visual.parameters())


def test_partition_arithmetic_by_hand():
    modules = [("a", "language", 2, (10, 7)), ("b", "vision", 1, (8,))]
    assert mp.partition_numel(modules, 1) == 2 * 17 + 8
    assert mp.partition_numel(modules, 3) == 2 * (4 + 3) + 3
    assert mp.partition_numel(modules, 8) == 2 * (2 + 1) + 1
    assert mp.persisted_numel(modules, 8) == 2 * 7 + 8


@pytest.mark.parametrize("tied, bf16, freeze", [(False, True, False), (True, False, True)],
                         ids=["untied-bf16-full", "tied-fp32-frozen-vision"])
def test_model_states_equal_what_a_real_zero3_engine_allocates(process_group, tied, bf16, freeze):
    config = release_config(tied)  # the real vocabulary rows: 152,064 untied, 151,936 tied
    model = build(config, torch.bfloat16 if bf16 else torch.float32)
    if freeze:
        model.model.visual.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3_train_config(
        micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, bf16=bf16, param_persistence_threshold=0))
    settings = mp.Settings(gpus_per_node=1, dtype="bfloat16" if bf16 else "float32", freeze_vision_tower=freeze,
                           param_persistence_threshold=0)
    plan = mp.make_plan(config, settings)
    zero = engine.optimizer
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    params = list(engine.module.parameters())
    assert sum(p.ds_numel for p in params) == plan.total_params
    assert sum(p.ds_tensor.ds_numel for p in params) == plan.states["partition_elements"] == plan.total_params
    assert sum(nbytes(p.ds_tensor) for p in params) == plan.states["weights"]
    assert sum(t.numel() for t in zero.fp32_partitioned_groups_flat) == plan.trainable_params
    assert plan.trainable_params == plan.total_params - (mp.numel(mp.parameter_modules(plan.shape), "vision")
                                                         if freeze else 0)
    assert sum(nbytes(t) for t in zero.fp32_partitioned_groups_flat) == plan.states["master"]
    assert nbytes(zero.grad_partitions_flat_buffer) == plan.states["gradients"]
    assert sum(nbytes(b.buffer) for b in zero.ipg_buckets.values()) == plan.states["reduce_bucket"]

    loss = engine(input_ids=torch.arange(8).unsqueeze(0), use_cache=False, logits_to_keep=1).logits.float().sum()
    engine.backward(loss)
    engine.step()  # AdamW's moments appear at the first step
    moments = [t for group in zero.fp32_partitioned_groups_flat
               for k, t in zero.optimizer.state[group].items() if k != "step"]
    assert sum(nbytes(t) for t in moments) == plan.states["adam"]


def lora_args(rank, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"):
    return types.SimpleNamespace(lora_rank=rank, lora_alpha=2.0 * rank, lora_dropout=0.0, lora_target_modules=targets,
                                 model_path="config")


@pytest.mark.parametrize("name, targets", [("qwen2.5-vl-7b-instruct", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
                                            "down_proj"), ("qwen3-vl-8b-instruct", "q_proj,v_proj")])
def test_lora_adapters_count_what_peft_adds_to_the_release(name, targets):
    from sophiavl.utils.lora import add_adapters

    _, config = mp.load_config(name)
    model = build(config, device="meta")
    add_adapters(model, lora_args(64, targets), seed=0)
    plan = mp.make_plan(config, mp.Settings(lora_rank=64, lora_target_modules=tuple(targets.split(","))))
    adapters = [p for p in unique_params(model) if p.requires_grad]
    assert plan.trainable_params == sum(p.numel() for p in adapters) == mp.numel(
        mp.lora_modules(plan.shape, 64, targets.split(",")))
    assert plan.total_params == PUBLIC_TOTALS[name]  # the base model: what vLLM, the export and the reference hold
    assert "reference model" not in [label.split(",")[0] for label, _ in plan.rows]


def test_lora_model_states_equal_what_a_real_zero3_engine_allocates(process_group):
    """The adapters made after the model, converted and partitioned by deepspeed.initialize, as LoRA runs them."""
    from sophiavl.utils.lora import add_adapters

    config = release_config(False)
    model = build(config, torch.bfloat16)
    add_adapters(model, lora_args(8), seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero3_train_config(
        micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, bf16=True, param_persistence_threshold=0))
    plan = mp.make_plan(config, mp.Settings(gpus_per_node=1, lora_rank=8, param_persistence_threshold=0))
    zero, nbytes = engine.optimizer, (lambda t: t.numel() * t.element_size())
    params = list(engine.module.parameters())
    assert sum(p.ds_numel for p in params if not p.requires_grad) == plan.total_params
    assert sum(p.ds_tensor.ds_numel for p in params) == plan.states["partition_elements"]
    assert sum(nbytes(p.ds_tensor) for p in params) == plan.states["weights"]
    assert sum(t.numel() for t in zero.fp32_partitioned_groups_flat) == plan.trainable_params == \
        sum(p.ds_numel for p in params if p.requires_grad)
    assert sum(nbytes(t) for t in zero.fp32_partitioned_groups_flat) == plan.states["master"]
    assert nbytes(zero.grad_partitions_flat_buffer) == plan.states["gradients"]


def test_lora_plans_no_reference_copy_and_says_what_that_saves():
    _, config = mp.load_config("qwen2.5-vl-7b-instruct")
    full = mp.make_plan(config, mp.Settings(gradient_checkpointing=True))
    lora = mp.make_plan(config, mp.Settings(gradient_checkpointing=True, lora_rank=64))
    rows = {label: values for label, values in lora.rows}
    assert "reference model, partition" in dict(full.rows) and "reference model, partition" not in rows
    adapters = mp.partition_numel(mp.lora_modules(lora.shape, 64, mp.LORA_TARGETS), 8)
    assert lora.states["weights"] - full.states["weights"] == 2 * adapters  # the adapters, in bf16, partitioned
    assert lora.states["master"] == 4 * adapters and lora.states["adam"] == 8 * adapters
    assert rows["activations, vision tower (1 image(s), 5120 patches)"]["update"] == 0  # frozen: nothing kept
    text = mp.format_plan(lora, config)
    saved = mp.gib(dict(full.rows)["reference model, partition"]["update"])
    assert f"reference model the base model with the adapters disabled (KL 0.04; no copy: {saved} GiB less" in text
    assert "161.5M trainable" in text
    with pytest.raises(mp.InputError, match="--lora-target-modules qkv: the plan knows"):
        mp.make_plan(config, mp.Settings(lora_rank=8, lora_target_modules=("qkv",)))


def test_deepspeed_estimator_numbers_are_its_own():
    _, config = mp.load_config("qwen2.5-vl-7b-instruct")
    plan = mp.make_plan(config, mp.Settings(gpus_per_node=8))
    largest = 152064 * 3584  # the embedding matrix (and the untied lm_head)
    assert plan.estimate == estimate_zero3_model_states_mem_needs(
        8_292_166_656, largest, num_gpus_per_node=8, num_nodes=1, cpu_offload=False, cpu_offload_params=False)
    assert plan.estimate[1] == 4 * largest + int(18 * 8_292_166_656 / 8)
    per_rank = math.ceil(8_292_166_656 / 8)  # every 7B tensor splits evenly over 8 ranks but for rounding
    assert abs(plan.states["partition_elements"] - per_rank) < 2_000
    assert plan.states["master"] == 4 * plan.states["trainable_elements"] and plan.states["adam"] == \
        8 * plan.states["trainable_elements"]


def test_image_tokens_follow_the_qwen_vl_rule():
    from transformers.image_utils import SizeDict

    from sophiavl.utils.vision import image_token_count

    image_processor = transformers.Qwen2VLImageProcessor(patch_size=14, merge_size=2)
    image_processor.size = SizeDict(shortest_edge=3136, longest_edge=1003520)
    processor = types.SimpleNamespace(image_processor=image_processor)
    shape = mp.shape_from_config(mp.load_config("qwen2.5-vl-7b-instruct")[1])
    assert mp.image_tokens(shape, 1003520) == 1280 == image_token_count(1120, 896, processor)  # 40 x 32 merged
    for width, height in [(4000, 3000), (1024, 1024), (640, 480), (3000, 200)]:
        assert image_token_count(width, height, processor) <= mp.image_tokens(shape, 1003520)
    assert mp.image_tokens(mp.shape_from_config(QWEN3_TINY), 1003520) == 1003520 // 32 ** 2  # 16 x 2 pixels a side


def test_prompts_per_micro_batch():
    assert [mp.prompts_per_micro_batch(m, 8) for m in (1, 4, 8, 16)] == [1, 1, 1, 2]
    assert mp.prompts_per_micro_batch(3, 8) == 2  # completions 6, 7, 8 span two groups
    assert mp.prompts_per_micro_batch(12, 8) == 2 and mp.prompts_per_micro_batch(5, 1) == 5


def saved_bytes(run, exclude) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `run` runs, parameters excluded."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


@pytest.mark.parametrize("config", [qwen25_tiny(), QWEN3_TINY], ids=["qwen2.5-vl", "qwen3-vl"])
def test_activation_formula_matches_the_bytes_autograd_saves(config):
    model = build(config, torch.bfloat16).train()
    shape = mp.shape_from_config(config)
    rows, length, side = 2, 64, 8  # two prompts of 64 tokens, each with an image of 8 x 8 patches
    tokens = side * side // shape.merge ** 2
    ids = torch.randint(0, 900, (rows, length))
    ids[:, 4:4 + tokens] = config["image_token_id"]
    pixels = torch.randn(rows * side * side, 3 * 2 * shape.patch ** 2)
    grid = torch.tensor([[1, side, side]] * rows)
    mm_types = (ids == config["image_token_id"]).long()
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = saved_bytes(lambda: model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                                         mm_token_type_ids=mm_types, logits_to_keep=1, use_cache=False), exclude)
    settings = mp.Settings(micro_batch_size=rows, prompt_length=length, completion_length=0, num_generations=1,
                           max_pixels=tokens * (shape.patch * shape.merge) ** 2, attn_implementation="sdpa")
    acts = mp.activation_bytes(shape, settings, rows)
    assert acts["patches"] == rows * side * side and acts["tokens"] == rows * length
    assert measured == pytest.approx(acts["llm"] + acts["vision"], rel=0.01)

    # the layers are most of it: one layer alone is exact
    language = model.model.language_model
    hidden = torch.randn(rows, length, shape.hidden, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(length).expand(3, rows, length)
    rotary = language.rotary_emb(hidden, positions)
    layer = saved_bytes(lambda: language.layers[0](hidden, position_embeddings=rotary, attention_mask=None,
                                                   position_ids=positions),
                        exclude | {t.untyped_storage().data_ptr() for t in rotary})
    assert layer == mp.llm_layer_bytes(shape, 2) * rows * length


def test_logits_formula_counts_the_fp32_rows_and_the_entropy():
    from step2_trust_grpo.loss import entropy_from_logits, selective_log_softmax

    rows, width, vocab = 3, 5, 1000
    logits = torch.randn(rows, width, vocab, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, vocab, (rows, width))
    kept = saved_bytes(lambda: (selective_log_softmax(logits, ids), entropy_from_logits(logits)),
                       {logits.untyped_storage().data_ptr()})
    assert kept == pytest.approx(rows * width * vocab * (4 + 8), rel=0.01)  # fp32 rows; log-probs and probs
    shape = mp.shape_from_config(QWEN3_TINY)
    settings = mp.Settings(logits_length=width)
    per_cell = 3 * 2 + 4 + 8  # bf16 logits, their divided copy and gradient; the kept fp32 bytes above
    assert mp.activation_bytes(shape, settings, rows)["logits"] == rows * width * 152000 * per_cell + 8 * width * 152000


def test_vllm_share_is_freed_by_sleep_mode_during_the_update():
    _, config = mp.load_config("qwen2.5-vl-7b-instruct")
    awake = mp.make_plan(config, mp.Settings(gradient_checkpointing=True))
    asleep = mp.make_plan(config, mp.Settings(gradient_checkpointing=True, vllm_sleep_mode=True))
    gpu = mp.GPUS["80GB"]
    for phase in ("update", "step"):
        assert awake.totals(gpu)[phase] - asleep.totals(gpu)[phase] == pytest.approx(0.4 * gpu)
    assert awake.totals(gpu)["rollout"] == asleep.totals(gpu)["rollout"]
    host = {label: n for label, n, _ in asleep.host}
    assert host["vLLM sleep: weights kept in pinned memory"] == 8 * 2 * 8_292_166_656
    assert asleep.host_peak() == 8 * 2 * 8_292_166_656 + max(host["final HF model, gathered on rank 0"],
                                                               host["DeepSpeed checkpoint save: one fp32 flat "
                                                                    "partition at a time"])
    no_reference = mp.make_plan(config, mp.Settings(gradient_checkpointing=True, kl_coef=0.0))
    assert awake.totals(gpu)["update"] - no_reference.totals(gpu)["update"] == awake.states["weights"]
    offloaded = mp.make_plan(config, mp.Settings(gradient_checkpointing=True, offload_reference=True))
    persisted = 2 * mp.persisted_numel(mp.parameter_modules(mp.shape_from_config(config)), 10_000)
    assert awake.totals(gpu)["update"] - offloaded.totals(gpu)["update"] == awake.states["weights"] - persisted
    assert {label: n for label, n, _ in offloaded.host}["offloaded reference weights"] == 8 * awake.states["weights"]
    too_small = mp.make_plan(config, mp.Settings(vllm_gpu_memory_utilization=0.3, vllm_sleep_mode=True))
    assert any("cannot hold its weights" in p for p in too_small.problems(mp.GPUS["40GB"]))


def test_the_transformers_engine_holds_a_whole_copy_and_its_generation_cache():
    """--rollout-engine hf (the fallback where vLLM is missing) keeps an unsharded copy of the policy on every GPU
    and generates a rank's completions at once; the plan once left both out (it knew only vLLM's share)."""
    _, config = mp.load_config("qwen2.5-vl-7b-instruct")
    none = mp.make_plan(config, mp.Settings(gradient_checkpointing=True, vllm_gpu_memory_utilization=0.0))
    hf = mp.make_plan(config, mp.Settings(gradient_checkpointing=True, vllm_gpu_memory_utilization=0.0,
                                          hf_rollout_sequences=128))
    gpu, copy = mp.GPUS["80GB"], 2 * 8_292_166_656  # bf16, every parameter
    assert none.phases() == ["update", "step"] and hf.phases() == ["rollout", "update", "step"]
    for phase in ("update", "step"):
        assert hf.totals(gpu)[phase] - none.totals(gpu)[phase] == copy
    # 128 sequences x (4,096 + 1,024) tokens x (k and v) x 28 layers x 4 KV heads x 128 x 2 B
    kv = 128 * 5120 * 2 * 28 * 4 * 128 * 2
    assert kv == 37_580_963_840
    held = sum(row["step"] for _, row in none.rows if "update" in row and "step" in row)
    assert hf.totals(gpu)["rollout"] == held + copy + kv + 4 * mp.GIB  # the trainer's states, the copy, the cache
    assert "vLLM off (transformers generates 128 sequences at once)" in mp.format_plan(hf, config)


def test_cli_prints_the_table_and_the_verdicts(capsys):
    mp.main(["--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--gradient-checkpointing", "--vllm-sleep-mode"])
    out = capsys.readouterr().out
    assert "8.29B parameters" in out and "reference model kept (KL 0.04)" in out
    assert "DeepSpeed estimate_zero3_model_states_mem_needs: 19.4 GiB per GPU" in out
    verdicts = [line for line in out.splitlines() if "largest micro-batch" in line]
    assert [v.split()[0] for v in verdicts] == ["40GB", "80GB", "141GB"]
    assert "does NOT fit" in verdicts[0] and ": fits;" in verdicts[1] and ": fits;" in verdicts[2]

    mp.main(["--model", "qwen2.5-vl-3b-instruct", "--stage", "1"])
    out = capsys.readouterr().out
    assert "vLLM off; reference model none" in out and "rollout" not in out

    with pytest.raises(SystemExit) as exit_info:
        mp.main(["--model", "no-such-model"])
    assert exit_info.value.code == 2 and "qwen3-vl-8b-instruct" in capsys.readouterr().err


def test_a_model_folder_and_its_config_json_load(tmp_path):
    with open(tmp_path / "config.json", "w") as handle:
        json.dump(QWEN3_TINY, handle)
    assert mp.load_config(str(tmp_path))[1] == mp.load_config(os.path.join(tmp_path, "config.json"))[1] == QWEN3_TINY


def test_stage_command_lines_map_onto_the_plan(monkeypatch):
    from step1_reward_model.main import parse_args as step1_args
    from step2_trust_grpo.arguments import parse_args as step2_args

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    args = step2_args(["--model-path", "Qwen/Qwen2.5-VL-7B-Instruct", "--registry", "r.json", "--data-path", "d",
                       "--output-dir", "o", "--gradient-checkpointing", "--vllm-sleep-mode", "--max-pixels", "802816"])
    assert mp.settings_from_args(args, 16, stage=2) == mp.Settings(
        gpus_per_node=8, nodes=2, gradient_checkpointing=True, vllm_sleep_mode=True, max_pixels=802816)
    args = step2_args(["--model-path", "m", "--registry", "r.json", "--data-path", "d", "--output-dir", "o",
                       "--rollout-engine", "hf", "--kl-coef", "0", "--entropy-coef", "0", "--offload"])
    assert mp.settings_from_args(args, 8, stage=2) == mp.Settings(  # 128 prompts x 8 over 8 ranks
        vllm_gpu_memory_utilization=0.0, hf_rollout_sequences=128, kl_coef=0.0, entropy_grad=False, offload=True)
    args = step1_args(["--model-path", "m", "--train-data", "t.jsonl", "--output-dir", "o", "--max-length", "4096",
                       "--micro-batch-size", "2", "--freeze-vision-tower", "--attn-implementation", "sdpa"])
    assert mp.settings_from_args(args, 8, stage=1) == mp.Settings.step1(
        prompt_length=4096, micro_batch_size=2, freeze_vision_tower=True, attn_implementation="sdpa")
    args = step1_args(["--model-path", "m", "--train-data", "t.jsonl", "--output-dir", "o", "--lora-rank", "16",
                       "--lora-target-modules", "q_proj,v_proj"])
    assert mp.settings_from_args(args, 8, stage=1) == mp.Settings.step1(lora_rank=16,
                                                                         lora_target_modules=("q_proj", "v_proj"))


def test_plan_flag_of_the_stages_prints_the_plan_and_exits(monkeypatch, capsys, tmp_path):
    from step1_reward_model.main import main as step1_main
    from step2_trust_grpo.main import main as step2_main

    for name, value in {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    output = tmp_path / "out"  # nothing is read (no such data) or written
    step2_main(["--model-path", "Qwen/Qwen2.5-VL-7B-Instruct", "--registry", "no.json", "--data-path", "none",
                "--output-dir", str(output), "--trm-url", "http://trm.invalid/v1", "--gradient-checkpointing",
                "--vllm-sleep-mode", "--plan"])
    printed = capsys.readouterr().out
    assert "16 GPUs (8 per node x 2)" in printed and "sleep mode on; reference model kept (KL 0.04)" in printed
    step1_main(["--model-path", "Qwen/Qwen2.5-VL-3B-Instruct", "--train-data", "no.jsonl", "--output-dir",
                str(output), "--plan"])
    assert "lm_head tied" in capsys.readouterr().out and not output.exists()
    monkeypatch.setenv("RANK", "3")  # under the deepspeed launcher only rank 0 prints
    step1_main(["--model-path", "Qwen/Qwen2.5-VL-3B-Instruct", "--train-data", "no.jsonl", "--output-dir",
                str(output), "--plan"])
    assert capsys.readouterr().out == ""
