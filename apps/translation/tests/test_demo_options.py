"""``flexmoe-mt demo``: options are checked before any training, one line, exit status 2."""

from __future__ import annotations

import pytest

from flexmoe_mt.cli import main


@pytest.mark.parametrize(
    "options,named",
    [(["--per-direction", "-3"], "--per-direction"), (["--tsv-dir", "missing"], "train.tsv")],
)
def test_bad_options_stop_before_training(tmp_path, monkeypatch, capsys, options, named):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "1", *options])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\\n") == 0 and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # nothing trained
