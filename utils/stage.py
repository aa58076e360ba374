"""Run a stage's script by its path and still import the files beside it, even in a copy of the stage's folder.

Users copy a stage to change it (`cp -r step2_trust_grpo my_grpo && deepspeed --num_gpus 2 my_grpo/main.py ...`).
Inside a stage, modules import their siblings relatively (`from .loss import grpo_loss`); absolute imports
(`from step2_trust_grpo.loss import ...`) would silently run the installed original instead of the copy. A file
run by path has no package, so each entry script starts with

    if not __package__:  # run as a script (`deepspeed step2_trust_grpo/main.py`, or a copy of the folder)
        from sophiavl.utils.stage import stage_package
        __package__ = stage_package(__file__)

and its relative imports then find the files beside it, whatever the folder is called. The import path is not
touched: the folder becomes a package in sys.modules, nothing else is made importable.
"""
import importlib.machinery
import os
import sys
import types


def stage_package(script: str) -> str:
    """Register the folder holding `script` as a package named after the folder (its `__init__.py` is not run;
    the stages' are empty) and return the name, for the script's `__package__`. A package of that name imported
    already must be that same folder: anything else (a copy called `json`, say) would be a silent mix-up."""
    folder = os.path.dirname(os.path.realpath(script))
    name = os.path.basename(folder)
    package = sys.modules.get(name)
    if package is None:
        package = types.ModuleType(name)
        package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        package.__spec__.submodule_search_locations = package.__path__ = [folder]
        sys.modules[name] = package
    elif folder not in [os.path.realpath(p) for p in getattr(package, "__path__", [])]:
        where = getattr(package, "__file__", None) or list(getattr(package, "__path__", []))
        raise ImportError(f"{script}: its folder's name {name!r} is the name of another module imported already "
                          f"({where}); rename the folder")
    return name
