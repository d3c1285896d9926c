"""The layer-wise optimizers the engine runs, one policy object each (base.Algorithm)."""
from .base import Algorithm, adapts, check_tensor_lr_value, options
from .lamb import LAMB_ALGORITHM, LAMB_DEFAULTS, Lamb
from .lars import LARS_ALGORITHM, LARS_DEFAULTS, TVLARS_ALGORITHM, TVLARS_DEFAULTS, Lars

__all__ = ["Algorithm", "Lars", "Lamb", "TVLARS_ALGORITHM", "LARS_ALGORITHM", "LAMB_ALGORITHM",
           "LARS_DEFAULTS", "TVLARS_DEFAULTS", "LAMB_DEFAULTS", "adapts", "check_tensor_lr_value", "options"]
