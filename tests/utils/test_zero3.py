"""ZeRO-3 gathering, checkpoints and HF export with a real DeepSpeed engine in one process (gloo, world size 1)."""
import copy
import os

import deepspeed
import pytest
import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from sophiavl.utils.ds_config import zero3_train_config
from sophiavl.utils.zero3 import gathered_weights, load_checkpoint, save_checkpoint, save_hf_model

LR = 0.1
INPUT = torch.linspace(-1, 1, 8).reshape(2, 4)


def tiny_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def make_engine(model):
    config = zero3_train_config(micro_batch_size=2, gradient_accumulation_steps=1, world_size=1, bf16=False,
                                param_persistence_threshold=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def train_step(engine):
    engine.backward(engine(INPUT).sum())
    engine.step()


def weights(engine):
    return dict(gathered_weights(engine.module))


def test_gathered_weights_are_full_and_follow_training(process_group):
    model = tiny_model(seed=0)
    before = copy.deepcopy(model)
    engine = make_engine(model)
    names = [name for name, _ in before.named_parameters()]
    # every parameter is really sharded: the local data is empty outside a gather
    assert all(p.data.numel() == 0 for p in engine.module.parameters())

    gathered = list(gathered_weights(engine.module, params_per_gather=3))  # 4 parameters: chunks of 3 and 1
    assert [name for name, _ in gathered] == names
    for (name, tensor), (_, expected) in zip(gathered, before.named_parameters()):
        assert tensor.shape == expected.shape
        assert torch.equal(tensor, expected.detach()), name

    # Adam's first step moves each weight by lr * g / (|g| + eps), i.e. lr * sign(g) (clipping keeps the sign)
    before(INPUT).sum().backward()
    train_step(engine)
    after = weights(engine)
    for name, param in before.named_parameters():
        expected = param.detach() - LR * torch.sign(param.grad)
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(after["1.bias"], before[1].bias.detach() - LR, rtol=0, atol=1e-6)


def test_save_keeps_the_last_checkpoints_and_points_latest_at_the_newest(process_group, tmp_path):
    engine = make_engine(tiny_model(seed=0))
    root = tmp_path / "checkpoints"
    os.makedirs(root / "step20")  # a newer tag, half written by a crashed run: not pruned
    for step in (9, 10, 11):
        save_checkpoint(engine, str(tmp_path), step)
        assert (root / "latest").read_text() == f"step{step}"
    # numeric order, not string order: step9 is the oldest
    assert sorted(d for d in os.listdir(root) if d.startswith("step")) == ["step10", "step11", "step20"]
    assert not [name for name in os.listdir(root) if name.startswith("latest.tmp")]
    assert os.listdir(root / "step11")  # the tag directory holds the engine's files

    save_checkpoint(engine, str(tmp_path), 12, keep_last=1)
    assert (root / "latest").read_text() == "step12"
    assert sorted(d for d in os.listdir(root) if d.startswith("step")) == ["step12", "step20"]


def test_resume_restores_weights_and_optimizer_state(process_group, tmp_path):
    engine = make_engine(tiny_model(seed=0))
    train_step(engine)
    saved = weights(engine)
    save_checkpoint(engine, str(tmp_path), step=1)
    train_step(engine)
    uninterrupted = weights(engine)

    resumed = make_engine(tiny_model(seed=1))
    assert load_checkpoint(resumed, str(tmp_path)) == 1
    for name, tensor in weights(resumed).items():
        assert torch.equal(tensor, saved[name]), name
    # the second Adam step matches the uninterrupted run only if the moments were restored too
    train_step(resumed)
    for name, tensor in weights(resumed).items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=1e-6)


def test_no_pointer_means_start_from_step_0(process_group, tmp_path):
    engine = make_engine(tiny_model(seed=0))
    initial = weights(engine)
    assert load_checkpoint(engine, str(tmp_path)) == 0  # no checkpoints folder at all
    # a crash between the tag directory and the pointer: the tag is ignored
    engine.save_checkpoint(str(tmp_path / "checkpoints"), tag="step3", client_state={"step": 3}, save_latest=False)
    assert load_checkpoint(make_engine(tiny_model(seed=1)), str(tmp_path)) == 0
    assert load_checkpoint(engine, str(tmp_path)) == 0
    for name, tensor in weights(engine).items():
        assert torch.equal(tensor, initial[name]), name


def test_a_pointer_to_a_missing_folder_fails_instead_of_starting_over(process_group, tmp_path):
    engine = make_engine(tiny_model(seed=0))
    save_checkpoint(engine, str(tmp_path), step=5)
    os.rename(tmp_path / "checkpoints" / "step5", tmp_path / "checkpoints" / "moved")
    with pytest.raises(Exception):  # DeepSpeed's own (bare) AssertionError today
        load_checkpoint(engine, str(tmp_path))


def test_save_hf_model_writes_a_loadable_directory_and_replaces_the_old_one(process_group, tmp_path):
    config = transformers.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")))
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    path = tmp_path / "final"
    os.makedirs(path)
    (path / "stale.txt").write_text("from an older save")

    engine = make_engine(model)
    save_hf_model(engine, tokenizer, str(path))
    assert not os.path.exists(f"{path}.tmp")
    assert not (path / "stale.txt").exists()
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path))
    loaded_weights = dict(loaded.named_parameters())
    assert set(loaded_weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded_weights[name].detach(), tensor), name
    assert transformers.AutoTokenizer.from_pretrained(str(path)).convert_tokens_to_ids("a") == 1
