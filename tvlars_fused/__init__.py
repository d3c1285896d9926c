"""tvlars_fused: fused TVLARS and LARS optimizers for PyTorch.

    from tvlars_fused import TVLARS, LARS      # fused, drop-in torch.optim optimizers
    from tvlars_fused.reference import TVLARS  # the eager reference they are checked against
"""
from . import reference
from .optimizer import LARS, TVLARS
from .param_groups import lars_param_groups
from .schedule import phi

__all__ = ["TVLARS", "LARS", "lars_param_groups", "phi", "reference"]
__version__ = "0.1.0"
