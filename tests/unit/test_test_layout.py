"""Unit: the test tree itself. `make test` runs every layer in one pytest session, and
test folders are not packages (rootdir-relative imports), so two test files with one
basename in different layers stop the whole run at collection ("import file
mismatch"). Each layer passes alone then, which is how the clash went unseen once."""

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_files_share_a_basename():
    names = Counter(p.name for p in TESTS.rglob("test_*.py") if ".venv" not in p.parts)
    assert [n for n, k in names.items() if k > 1] == []
