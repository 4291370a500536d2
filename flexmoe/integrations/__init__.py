"""Bridges to other libraries. Each submodule imports its library lazily; flexmoe itself does not need them."""
