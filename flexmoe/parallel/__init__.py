"""Distributed MoE: the expert layout, process groups, all-to-all, parallel degree, pipelining."""

from flexmoe.parallel.layout import HIDDEN_AXIS, ExpertLayout, unshard

__all__ = ["HIDDEN_AXIS", "ExpertLayout", "unshard"]
