"""python -m flexmoe ...: the flexmoe command."""

from flexmoe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
