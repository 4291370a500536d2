"""The README's commands run as written after `make test` / `make demo` set up .venv: each line of
its "Commands" block, with the demo's model directory replaced by a tiny trained run."""

import re
import subprocess
from pathlib import Path

import pytest
from translation_fixtures import write_run_file

from flexmoe_mt.cli import main as flexmoe_mt

REPO = Path(__file__).resolve().parents[3]
VENV_BIN = REPO / ".venv" / "bin"
COMMANDS_BLOCK = re.search(r"## Commands\n.*?```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def readme_commands() -> list[str]:
    lines = COMMANDS_BLOCK.group(1).splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.strip()]


def test_every_command_line_calls_a_program_of_the_venv():
    commands = readme_commands()
    assert commands
    for command in commands:
        assert re.match(r"(echo \"[^\"]*\" \| )?\.venv/bin/flexmoe(-mt)? ", command), command


@pytest.mark.skipif(not (VENV_BIN / "flexmoe-mt").is_file(), reason="needs .venv, which make test creates")
def test_readme_commands_run_as_written(tmp_path):
    config = write_run_file(tmp_path, "task_moe", model={"decoder_routing": "target"}, train={"max_steps": 2})
    assert flexmoe_mt(["train", "--config", str(config), "--quiet"]) == 0
    for command in readme_commands():
        command = command.replace("runs/demo/task_moe", str(tmp_path / "task_moe"))
        done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
