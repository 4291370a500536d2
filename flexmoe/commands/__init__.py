"""Generic ``flexmoe`` commands on any model named by a factory: ``extract``, ``infer``."""
