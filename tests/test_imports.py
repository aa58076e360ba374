"""The import conventions (README "Installed names"), checked on every Python file of the repository: modules are
imported by their installed names, never by path; a stage imports its own files relatively (so a copy of it runs its
own), and so does a script of benchmarks/ or experiments/ (run by its path, its folder is not importable); no test
module imports another."""
import ast
import os
import re
import subprocess

from tests.helpers import REPO

STAGES = ("step1_reward_model", "step2_trust_grpo", "step3_eval")


def python_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [path for path in listed if os.path.exists(os.path.join(REPO, path))]


def imports(path: str):
    """(line, imported module or None for a relative import, level) of every import in the file."""
    tree = ast.parse(open(os.path.join(REPO, path)).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.module, node.level


def test_nothing_edits_the_import_path_or_loads_a_module_by_its_file():
    found = [f"{path}:{n}" for path in python_files() for n, line in enumerate(open(os.path.join(REPO, path)), 1)
             if re.search(r"sys\.path\b|spec_from_file_(location)", line)]
    assert not found


def test_shared_code_is_imported_by_its_installed_name_and_stages_import_their_own_files_relatively():
    wrong = []
    for path in python_files():
        folder = path.split("/")[0]
        for line, module, level in imports(path):
            top = (module or "").split(".")[0]
            if level == 0 and top in ("utils", "demo"):  # installed as sophiavl.utils / sophiavl.demo
                wrong.append(f"{path}:{line} imports {module}")
            if level == 0 and folder in STAGES and top in STAGES:  # a copy of the stage would run the original's
                wrong.append(f"{path}:{line} imports {module}, not relatively")
            if level == 0 and folder in ("benchmarks", "experiments") and top == folder:  # works only from the root
                wrong.append(f"{path}:{line} imports {module} absolutely: `python {path}` cannot find it")
            if level == 0 and top == "tests" and re.search(r"(^|\.)test_", module or ""):
                wrong.append(f"{path}:{line} imports the test module {module}")
    assert not wrong
