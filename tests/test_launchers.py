"""Every flag a launcher passes to a stage's main.py exists there (a typo in a GPU launcher would only
show on the cluster), and every launcher is valid bash."""
import glob
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = sorted(glob.glob(os.path.join(REPO, "step*", "training_scripts", "**", "*.sh"), recursive=True))


def stage_flags(script: str) -> dict[str, set]:
    """{stage main/annotate/... path: flags given to it} from the launcher's command lines."""
    text = open(script).read().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        match = re.search(r"(step\d_\w+/\w+\.py)", line)
        if match and not line.lstrip().startswith("#"):
            after = line[match.end():]  # the launcher's own flags (--num_gpus, --hostfile) come before the script
            found.setdefault(match.group(1), set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", after))
    return found


def help_text(stage_script: str) -> str:
    result = subprocess.run([sys.executable, stage_script, "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


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
    helps = {}
    for stage, flags in stage_flags(script).items():
        text = helps.setdefault(stage, help_text(stage))
        unknown = sorted(f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
        assert not unknown, f"{os.path.relpath(script, REPO)} passes {unknown} to {stage}, which has no such flag"
