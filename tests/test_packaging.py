"""The library stands alone: importing any flexmoe module loads neither the translation
application nor its dependencies (they are not flexmoe's dependencies)."""

import subprocess
import sys

# (tqdm is left out: torch.hub imports it whenever it is installed.)
APPLICATION_ONLY = ("flexmoe_mt", "sentencepiece", "sacrebleu", "babel", "num2words", "matplotlib")

CHECK = f"""
import importlib, pkgutil, sys
import flexmoe
names = [m.name for m in pkgutil.walk_packages(flexmoe.__path__, "flexmoe.")]
optional = ("flexmoe.integrations",)  # the transformers extra
for name in names:
    if not name.startswith(optional):
        importlib.import_module(name)
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({APPLICATION_ONLY!r}))
print(len(names), loaded)
"""


def test_no_flexmoe_module_imports_the_application_or_its_dependencies():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count, loaded = done.stdout.split(" ", 1)
    assert int(count) > 30
    assert loaded.strip() == "[]"
