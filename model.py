"""The original tool's ``Model`` class (``from model import Model``), now from the package.

FedHub's Keras networks and the class live in :mod:`fedhub.frameworks.keras_model`; every
framework's networks are behind :mod:`fedhub.frameworks`.
"""

from fedhub.frameworks.keras_model import CLASS_NAMES, Model, image_to_array, preprocess

__all__ = ["CLASS_NAMES", "Model", "image_to_array", "preprocess"]
