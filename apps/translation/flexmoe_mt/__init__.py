"""flexmoe_mt: an end-to-end translation application built on flexmoe (model, corpus, training,
evaluation, per-language extraction, the flexmoe-mt command).

Heavier pieces (training, evaluation, plots) import on use: ``flexmoe_mt.train``,
``flexmoe_mt.evaluate``, ``flexmoe_mt.compare``, ``flexmoe_mt.extraction``.
"""

from flexmoe_mt.config import ModelConfig
from flexmoe_mt.translation import TranslationModel

__version__ = "0.1.0"

__all__ = ["ModelConfig", "TranslationModel", "__version__"]
