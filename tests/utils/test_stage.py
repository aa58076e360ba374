"""A stage's script run by its path imports the files beside it (utils/stage.py): the original's, and in a copy of
the folder the copy's, never the installed original's."""
import importlib
import shutil
import sys

import pytest

from sophiavl.utils.stage import stage_package
from tests.helpers import REPO, run_script

MARKER = "THE-COPY-S-OWN-ARGUMENTS"


def test_the_stage_script_and_a_copy_of_its_folder_each_run_their_own_modules(tmp_path):
    copy = tmp_path / "my_grpo"
    shutil.copytree(f"{REPO}/step2_trust_grpo", copy, ignore=shutil.ignore_patterns("__pycache__"))
    arguments = (copy / "arguments.py").read_text()
    (copy / "arguments.py").write_text(arguments.replace('help="group size N"', f'help="{MARKER}"'))
    loss = (copy / "loss.py").read_text()
    (copy / "loss.py").write_text(loss + '\nimport sys\nprint("loss.py of", __name__, file=sys.stderr)\n')

    copied = run_script([sys.executable, str(copy / "main.py"), "--help"], timeout=300, cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr[-3000:]
    assert MARKER in copied.stdout and "loss.py of my_grpo.loss" in copied.stderr

    original = run_script([sys.executable, "step2_trust_grpo/main.py", "--help"], timeout=300)
    assert original.returncode == 0, original.stderr[-3000:]
    assert "group size N" in original.stdout and MARKER not in original.stdout


def test_the_folder_becomes_a_package_of_its_name_and_a_clash_is_an_error(tmp_path, monkeypatch):
    folder = tmp_path / "my_stage"
    folder.mkdir()
    (folder / "sibling.py").write_text("VALUE = 7\n")
    monkeypatch.delitem(sys.modules, "my_stage", raising=False)
    monkeypatch.delitem(sys.modules, "my_stage.sibling", raising=False)
    assert stage_package(str(folder / "main.py")) == "my_stage"
    assert stage_package(str(folder / "main.py")) == "my_stage"  # again: the same package
    sibling = importlib.import_module(".sibling", "my_stage")
    assert sibling.VALUE == 7 and sibling.__file__ == str(folder / "sibling.py")

    clash = tmp_path / "json"  # a module of that name is imported already
    clash.mkdir()
    with pytest.raises(ImportError, match="rename the folder"):
        stage_package(str(clash / "main.py"))

