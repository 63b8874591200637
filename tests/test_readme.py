"""The README starts with exactly two commands: the main job and the test command; .ci/run runs the latter.

Fast checks run by default; ``-m slow`` also runs both commands from a fresh clone in a new virtualenv.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)[:2]]


def test_readme_starts_with_two_commands():
    text = (ROOT / "README.md").read_text()
    head = text.split("## ")[0]
    blocks = re.findall(r"```bash\n(.*?)```", head, flags=re.S)
    assert len(blocks) == 2, "the README must start with exactly two command blocks"
    main, tests = (b.strip() for b in blocks)
    assert "\n" not in main and "\n" not in tests
    assert main.endswith("python train.py")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()


def test_train_help_runs_as_a_script():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "presets:" in out.stdout


@pytest.mark.slow
def test_readme_commands_from_clean_clone(tmp_path):
    """Clone, make a venv, run the README's two commands (the main job's measured time is in the README)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    act = f". {tmp_path / 'venv' / 'bin' / 'activate'}"
    for cmd in readme_commands():
        r = subprocess.run(["bash", "-c", f"{act} && cd {clone} && {cmd}"], capture_output=True, text=True,
                           timeout=3600)
        assert r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
