"""The suite's own scheduling table (tests/conftest.py SHARED_RUNS): every file it groups exists, and each file is in
one group only, so that a renamed or moved test file cannot silently drop out of its shared run's worker."""
import os

from tests.conftest import GROUP_OF_FILE, SHARED_RUNS
from tests.helpers import REPO


def test_every_grouped_file_exists_and_belongs_to_one_group():
    paths = [path for _, files in SHARED_RUNS.values() for path in files]
    assert len(paths) == len(set(paths)) == len(GROUP_OF_FILE)
    assert [path for path in paths if not os.path.isfile(os.path.join(REPO, path))] == []
