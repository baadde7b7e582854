"""The README's two commands are true: CI runs the second verbatim, and the first
installs the package into a fresh virtual environment and runs the quickstart job."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)][:2]


def test_readme_opens_with_the_two_commands():
    run_cmd, test_cmd = readme_commands()
    assert "orchestrator train configs/quickstart.yaml" in run_cmd
    assert "pytest" in test_cmd and ".[test]" in test_cmd
    head = (REPO / "README.md").read_text().split("```bash", 3)
    assert len(head[0]) < 600, "the two commands must open the README"


def test_ci_runs_the_readme_test_command_verbatim():
    _, test_cmd = readme_commands()
    ci_lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def _copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


@pytest.mark.timeout(900)
def test_quickstart_command_in_fresh_venv(tmp_path):
    """Runs README command 1 exactly as written, in a fresh venv on a copy of the checkout."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy")
    run_cmd, _ = readme_commands()
    checkout = tmp_path / "checkout"
    _copy_checkout(checkout)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = subprocess.run(["bash", "-c", run_cmd], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (checkout / "runs" / "quickstart" / "checkpoints" / "checkpoint").is_file()
