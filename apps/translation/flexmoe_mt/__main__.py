"""python -m flexmoe_mt ...: the flexmoe-mt command (torchrun ... -m flexmoe_mt train ... too)."""

from flexmoe_mt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
