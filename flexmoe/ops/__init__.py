"""Low-level operations (autograd functions) that the layers compose."""

from flexmoe.ops.dispatch import combine, dispatch

__all__ = ["combine", "dispatch"]
