"""idgbr-geo: IDGBR diffusion boundary refinement for large georeferenced rasters."""

from .cards import ModelCard, Normalization
from .errors import InputError, OutputError, UserError
from .interfaces import Model, Refiner, Segmentor
from .registry import load_model, register_architecture, save_model

__all__ = [
    "InputError", "Model", "ModelCard", "Normalization", "OutputError", "Refiner", "Segmentor",
    "UserError", "load_model", "register_architecture", "save_model",
]
__version__ = "0.1.0"
