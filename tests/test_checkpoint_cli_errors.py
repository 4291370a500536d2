"""``flexmoe checkpoint``: a mistake is one line on stderr and exit status 2, as for every command."""

from __future__ import annotations

import pytest

from flexmoe.cli import main


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    err = _fails(["checkpoint", "export", str(tmp_path / "missing"), str(tmp_path / "x.safetensors")], capsys)
    assert "holds no checkpoint" in err and "flexmoe checkpoint" in err


def test_unknown_action_exits_2(capsys):
    assert "invalid choice" in _fails(["checkpoint", "import", "a", "b"], capsys)
