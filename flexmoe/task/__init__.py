"""Task-level MoE deployment: sub-network extraction, expert pruning, usage statistics."""

from flexmoe.task.dense import DenseFFN
from flexmoe.task.extract import ExtractionReport, extract_task

__all__ = ["DenseFFN", "ExtractionReport", "extract_task"]
