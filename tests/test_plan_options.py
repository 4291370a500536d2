"""``flexmoe plan``: an option that would give a meaningless plan, or be ignored, is refused."""

from __future__ import annotations

import pytest

from flexmoe.cli import main


@pytest.mark.parametrize(
    "options,named",
    [
        (["--capacity-factor", "1e300"], "capacity_factor must be a number in 0..256"),
        (["--save-cluster", "cluster.json"], "--save-cluster writes the constants --calibrate fits"),
    ],
)
def test_refused_options(tmp_path, monkeypatch, capsys, options, named):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--preset", "a100-hdr", *options])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "cluster.json").exists()
