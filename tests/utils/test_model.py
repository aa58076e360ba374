"""--attn-implementation auto: flash_attention_2 only where CUDA is there and flash_attn imports, else sdpa."""
import sys
import types

import pytest
import torch

from sophiavl.utils.cli import InputError
from sophiavl.utils.model import load_model, resolve_attn_implementation


def test_auto_is_sdpa_on_this_cpu_machine():
    assert not torch.cuda.is_available()
    assert resolve_attn_implementation("auto") == "sdpa"


def test_other_names_go_to_transformers_unchanged():
    assert resolve_attn_implementation("sdpa") == "sdpa"
    assert resolve_attn_implementation("eager") == "eager"


def test_flash_attention_asked_for_without_the_package_names_flag_and_file():
    with pytest.raises(InputError, match=r"--attn-implementation flash_attention_2 .*requirements-flash-attn\.txt"):
        resolve_attn_implementation("flash_attention_2")


# CUDA and a flash_attn build cannot exist on the CPU machines this suite runs on: both are stood in for below.
@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_on_cuda_with_flash_attn_is_flash_attention_2(cuda, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert resolve_attn_implementation("auto") == "flash_attention_2"
    assert resolve_attn_implementation("flash_attention_2") == "flash_attention_2"


def test_auto_on_cuda_with_a_broken_flash_attn_is_sdpa(cuda, monkeypatch, tmp_path):
    # installed but built for another torch: the import itself fails, as a mismatched wheel's CUDA library does
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("raise OSError('flash_attn_2_cuda.so: undefined symbol')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_attn_implementation("auto") == "sdpa"


def test_auto_on_cuda_without_flash_attn_is_sdpa(cuda):
    assert resolve_attn_implementation("auto") == "sdpa"


def test_auto_without_cuda_ignores_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert resolve_attn_implementation("auto") == "sdpa"


def test_load_model_auto_loads_sdpa(tiny_assets):
    model = load_model(tiny_assets["model"], torch.float32, "auto")
    assert model.config._attn_implementation == "sdpa"
