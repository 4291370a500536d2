"""``flexmoe helloworld``: a bad option is one line naming it, exit status 2, before training
(an empty batch would train on nothing and report a NaN loss; a negative step count crashed)."""

from __future__ import annotations

import pytest

from flexmoe.cli import main


@pytest.mark.parametrize(
    "options,named",
    [
        (["--steps", "-1"], "--steps"),
        (["--steps", "0"], "--steps"),
        (["--batch-tokens", "0"], "--batch-tokens"),
        (["--clusters", "0"], "--clusters"),
        (["--num-experts", "0"], "num_experts"),
        (["--top-k", "9"], "top_k"),
        (["--capacity-factor", "1e300"], "capacity_factor"),
        (["--tune-cache", "x.json"], "--tune-cache needs --tune"),
        (["--tune-trials", "0"], "--tune-trials"),
    ],
)
def test_bad_options_are_one_line(capsys, options, named):
    with pytest.raises(SystemExit) as exit_info:
        main(["helloworld", "--steps", "1", "--batch-tokens", "8", *options])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flexmoe helloworld: error:") and named in err and err.count("\n") == 1
