"""The README is a user contract: its settings table and its commands must match the code."""
from pathlib import Path
import re

from scripts.settings_table import settings_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_settings_table_matches_the_settings_object():
    # regenerate with: .venv/bin/python scripts/settings_table.py
    assert settings_table() in README


def test_the_two_commands_exist_in_the_makefile_and_ci_runs_the_test_command():
    makefile = (ROOT / "Makefile").read_text()
    assert "make serve" in README and "make test" in README
    assert re.search(r"^serve:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


def test_example_files_named_in_the_readme_exist():
    for name in set(re.findall(r"examples/[\w.]+", README)):
        assert (ROOT / name).is_file(), name
