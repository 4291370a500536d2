"""Low-level operations (autograd functions) that the layers compose."""

from flexmoe.ops.aux_loss import attach_aux_loss
from flexmoe.ops.dispatch import combine, dispatch

__all__ = ["attach_aux_loss", "combine", "dispatch"]
