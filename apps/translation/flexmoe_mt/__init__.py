"""The end-to-end translation model: config, model, tokenizer, training, evaluation, extraction.

Heavier pieces (training, evaluation, plots) import on use: ``flexmoe.models.train``,
``flexmoe.models.evaluate``, ``flexmoe.models.compare``, ``flexmoe.models.extraction``.
"""

from flexmoe.models.config import ModelConfig
from flexmoe.models.translation import TranslationModel

__all__ = ["ModelConfig", "TranslationModel"]
