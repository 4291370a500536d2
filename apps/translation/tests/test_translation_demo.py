"""The demo's closing lines: where the models are, how to translate a sentence, what they know."""

from pathlib import Path
from types import SimpleNamespace

from flexmoe_mt.data.corpus import Pair
from flexmoe_mt.demo import next_steps


def trained(run_dir: str) -> SimpleNamespace:
    return SimpleNamespace(
        run=SimpleNamespace(train=SimpleNamespace(run_dir=run_dir)),
        tasks=SimpleNamespace(target_languages=("de", "fr")),
    )


def test_next_steps_say_where_how_and_what():
    example = Pair("January 3, 2024", "3. Januar 2024", "en", "de")
    text = next_steps(trained("runs/demo/task_moe"), trained("runs/demo/dense"), Path("runs/x/extract-fr"), example)
    assert "runs/demo/task_moe" in text and "runs/demo/dense" in text and "runs/x/extract-fr" in text
    assert 'echo "January 3, 2024" |' in text and "translate --model runs/demo/task_moe --to de --from en" in text
    assert "flexmoe-mt" in text and "one of de fr" in text
    assert "numbers" in text and "dates" in text and "units" in text and "not free text" in text
    assert "--fresh" in text


def test_demo_trains_a_fixed_number_of_steps_the_same_for_both_models():
    from flexmoe_mt.demo import demo_config

    moe, dense = demo_config("demo_task_moe", None, None), demo_config("demo_dense", None, None)
    assert moe.train.max_steps == dense.train.max_steps > 0  # the result does not depend on the machine's speed
    assert moe.train.max_minutes > 0  # only a cap against a stuck run
    assert demo_config("demo_dense", 50, None).train.max_steps == 50
    other = demo_config("demo_dense", None, None, seed=3)
    assert other.train.seed == 3 and other.train.run_dir == f"{dense.train.run_dir}-seed3"
