"""``flexmoe-mt throughput``: bad options are one line naming the option, exit status 2,
before any model loads."""

from __future__ import annotations

import pytest

from flexmoe_mt.cli import main


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["throughput", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("sizes", ["a,b", "8,x", ",", "0,8", "-1", "1.5"])
def test_batch_sizes_must_be_positive_integers(tmp_path, capsys, sizes):
    err = _fails(["--model", str(tmp_path), "--batch-sizes", sizes], capsys)
    assert "--batch-sizes" in err and "comma-separated integers >= 1" in err


def test_threads_must_not_be_negative(tmp_path, capsys):
    assert "--threads" in _fails(["--model", str(tmp_path), "--threads", "-3"], capsys)


def test_missing_model_is_named(tmp_path, capsys):
    err = _fails(["--model", str(tmp_path / "nothing")], capsys)
    assert "nothing" in err and "neither a training run" in err
