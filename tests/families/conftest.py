"""Session fixtures of the family matrix: one tiny model per family beyond Qwen2.5-VL (whose stages the rest of the
suite tests), built once and read by every stage's test, on a small copy of the synthetic tasks."""
import os

import pytest

FAMILY_NAMES = ("qwen2_vl", "qwen3_vl", "qwen3_5")
LOGIT_SCALE = 100.0  # a random init's logits are ~0.01, where two engines could break near-ties differently


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """{"registry", "data_dir", "models": {family: folder}}: tasks tiny_train (24 rows) and tiny_test (8), and each
    family's tiny model (demo/tiny_families.py) with its output layer scaled to a trained model's logits."""
    import torch

    from sophiavl.demo.build_tiny_assets import asset_paths, fixed_prompt_texts, task_texts, write_data
    from sophiavl.demo.tiny_families import build_tiny_family
    from sophiavl.utils.model import load_model

    root = str(tmp_path_factory.mktemp("families"))
    paths = asset_paths(root)
    splits = write_data(paths, seed=0, num_train=24, num_test=8)
    corpus = task_texts(splits["train"] + splits["test"])
    models = {}
    for family in FAMILY_NAMES:
        folder = os.path.join(root, family)
        build_tiny_family(folder, family, corpus, seed=0, fixed_texts=fixed_prompt_texts())
        model = load_model(folder, torch.float32)
        with torch.no_grad():
            model.lm_head.weight.mul_(LOGIT_SCALE)
        model.save_pretrained(folder)
        models[family] = folder
    return {"registry": paths["registry"], "data_dir": paths["data_dir"], "models": models}


def assets_of(families: dict, family: str) -> dict:
    """What tests.helpers.run_step2 reads of tiny_assets, for one family."""
    return {"model": families["models"][family], "registry": families["registry"]}


def pixel_flags(family: str) -> list[str]:
    """A 4x4-token image in the family's own grid (the shared tiny flags are Qwen2.5-VL's 112x112)."""
    from sophiavl.demo.tiny_families import image_pixels

    return ["--min-pixels", str(image_pixels(family)), "--max-pixels", str(image_pixels(family))]
