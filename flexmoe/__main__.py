"""``python -m flexmoe ...``: the ``flexmoe`` command (``torchrun ... -m flexmoe train ...`` too)."""

from flexmoe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
