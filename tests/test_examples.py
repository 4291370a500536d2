import math

from flexmoe.cli import main as cli_main
from flexmoe.examples import helloworld


def test_helloworld_trains():
    first = helloworld.main(["--steps", "1", "--batch-tokens", "256", "--seed", "3"])
    last = helloworld.main(["--steps", "60", "--batch-tokens", "256", "--seed", "3"])
    assert math.isfinite(last) and last < 0.5 * first


def test_cli_runs_helloworld():
    assert cli_main(["helloworld", "--steps", "2", "--batch-tokens", "32", "--capacity-factor", "1.0"]) == 0
