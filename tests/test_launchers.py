"""The launchers: every flag they pass exists (a typo in a GPU launcher would only show on the cluster), every
one is valid bash, and every one follows the convention stated in the README ("Launchers"): OUTPUT first, paths
relative to the caller's folder (no `cd`), the extra arguments passed through last, the log in
$OUTPUT/training.log, and a copied stage's launcher runs the copy's own scripts. The convention is checked by
running each launcher with `python`, `deepspeed`, `vllm` and `curl` replaced by stubs that record their calls."""
import contextlib
import functools
import glob
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = sorted(glob.glob(os.path.join(REPO, "step*", "training_scripts", "**", "*.sh"), recursive=True))
SERVERS = [p for p in LAUNCHERS if os.path.basename(p).startswith("serve_")]  # no OUTPUT: they write nothing
EXTRA = "--launcher-test-flag"


def stage_of(script: str) -> str:
    return os.path.join(REPO, os.path.relpath(script, REPO).split(os.sep)[0])


def stage_flags(script: str) -> dict[str, set]:
    """{script path: flags given to it} from the launcher's command lines; a launcher that calls another
    launcher of its stage gives its flags to the stage's main.py."""
    text = open(script).read().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = (re.search(r"\$STAGE/(\w+\.py)", line) or re.search(r"\$REPO/(demo/\w+\.py)", line)
                 or re.search(r"((?:run|train)_\w+\.sh)\"", line))
        if match:
            name = match.group(1)
            target = (os.path.join(REPO, name) if name.startswith("demo/") else
                      os.path.join(stage_of(script), "main.py" if name.endswith(".sh") else name))
            after = line[match.end():]  # the launcher's own flags (--num_gpus, --hostfile) come before the script
            found.setdefault(target, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", after))
    return found


@functools.cache
def help_text(stage_script: str) -> str:
    """The script's --help, run as a script in this process (`python SCRIPT --help` pays the imports again: several
    seconds a script; tests/utils/test_stage.py runs one as a process)."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), \
            pytest.raises(SystemExit) as exit_info:
        patch.setattr(sys, "argv", [stage_script, "--help"])
        runpy.run_path(stage_script, run_name="__main__")
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def test_there_are_launchers_for_every_stage():
    names = {os.path.relpath(p, REPO) for p in LAUNCHERS}
    for expected in ("step1_reward_model/training_scripts/train_tiny_cpu.sh",
                     "step1_reward_model/training_scripts/train_qwen2_5_vl_3b.sh",
                     "step2_trust_grpo/training_scripts/run_tiny_cpu.sh",
                     "step2_trust_grpo/training_scripts/run_qwen2_5_vl_7b.sh",
                     "step2_trust_grpo/training_scripts/run_multinode.sh",
                     "step3_eval/training_scripts/run_qwen2_5_vl_7b.sh"):
        assert expected in names
    assert len(glob.glob(os.path.join(REPO, "step2_trust_grpo/training_scripts/ablations/*.sh"))) == 5


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: os.path.relpath(p, REPO))
def test_launcher_is_valid_bash_and_its_flags_exist(script):
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    flags = stage_flags(script)
    assert flags or script in SERVERS, "no stage script found in the launcher"
    for target, given in flags.items():
        text = help_text(target)
        unknown = sorted(f for f in given if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
        assert not unknown, f"{os.path.relpath(script, REPO)} passes {unknown} to {target}, which has no such flag"


def positionals(script: str) -> list[str]:
    """The positional arguments of the launcher's Usage line, e.g. ['OUTPUT', 'MODEL', '[TRM_URL]']."""
    usage = re.search(r"^# Usage: \S+ (.*)$", open(script).read(), re.M)
    assert usage, f"{script} has no '# Usage:' line"
    return re.findall(r"\[?[A-Z][A-Z0-9_]*\]?", usage.group(1).split("[extra")[0])


STUB = """#!/usr/bin/env bash
exec {python} -c 'import json, os, sys
with open(os.environ["LAUNCHER_CALLS"], "a") as f:
    f.write(json.dumps({{"program": sys.argv[1], "cwd": os.getcwd(), "args": sys.argv[2:]}}) + "\\n")
print("stub:", *sys.argv[1:])' "$(basename "$0")" "$@"
"""


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stubs")
    for program in ("python", "deepspeed", "vllm", "curl"):
        path = folder / program
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(0o755)
    return folder


def run_launcher(script, caller, stubs):
    """Run `script` from the folder `caller` with relative paths for OUTPUT and every input; its recorded calls."""
    args = []
    for name in positionals(script):
        name = name.strip("[]")
        if name == "OUTPUT":
            args.append("out/run")
        else:
            path = caller / "in" / name
            if name in ("ASSETS", "MODEL", "INIT_MODEL"):
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(exist_ok=True)
                path.write_text("node1 slots=8\n")  # any input file; HOSTFILE is read by awk
            args.append(f"in/{name}")
    calls = caller / "calls.jsonl"
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": str(stubs / "python"),
           "LAUNCHER_CALLS": str(calls), "READY_TIMEOUT": "5"}
    result = subprocess.run(["bash", str(script), *args, EXTRA], cwd=caller, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in calls.read_text().splitlines()]


LAUNCHERS_WITH_OUTPUT = [p for p in LAUNCHERS if p not in SERVERS]


@pytest.mark.parametrize("script", LAUNCHERS_WITH_OUTPUT, ids=lambda p: os.path.relpath(p, REPO))
def test_launcher_follows_the_convention(script, stubs, tmp_path):
    assert positionals(script)[0].strip("[]") == "OUTPUT", "OUTPUT must be the first positional argument"
    caller = tmp_path / "elsewhere"  # a folder outside the repository, relative paths from there
    caller.mkdir()
    calls = run_launcher(script, caller, stubs)
    stage = stage_of(script)
    # every path given relative to the caller's folder means the same file where the program receives it
    for call in calls:
        for arg in call["args"]:
            if arg.startswith(("out/run", "in/")):
                resolved = os.path.normpath(os.path.join(call["cwd"], arg))
                assert resolved.startswith(str(caller)), f"{arg} read from {call['cwd']}: the launcher cd'ed"
    scripts = [next((a for a in call["args"] if a.endswith(".py")), "") for call in calls]
    passed_on = [s for call, s in zip(calls, scripts) if call["args"][-1] == EXTRA]
    assert len(passed_on) == 1 and os.path.dirname(passed_on[0]) == stage, \
        f"the extra arguments must reach one of the stage's scripts last, got {passed_on}"
    log = caller / "out" / "run" / "training.log"
    assert log.exists() and f"{os.path.basename(passed_on[0])}" in log.read_text()


def test_servers_pass_extra_flags_through():
    for script in SERVERS:
        assert re.search(r'"\$@"\s*$', open(script).read().rstrip(), re.M), script


@pytest.mark.parametrize("stage", ["step1_reward_model", "step2_trust_grpo", "step3_eval"])
def test_a_copied_stage_launches_its_own_scripts(stage, stubs, tmp_path):
    copy = tmp_path / "repo" / "my_stage"
    shutil.copytree(os.path.join(REPO, stage), copy, ignore=shutil.ignore_patterns("__pycache__"))
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    for script in sorted(glob.glob(str(copy / "training_scripts" / "**" / "*.sh"), recursive=True)):
        if os.path.basename(script).startswith("serve_"):
            continue
        (caller / "calls.jsonl").unlink(missing_ok=True)
        calls = run_launcher(script, caller, stubs)
        stage_scripts = [a for call in calls for a in call["args"] if a.endswith(".py") and "/demo/" not in a]
        assert stage_scripts and all(os.path.dirname(a) == str(copy) for a in stage_scripts), (script, stage_scripts)
