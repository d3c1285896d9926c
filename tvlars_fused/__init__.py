"""tvlars_fused: fused TVLARS, LARS and LAMB optimizers for PyTorch.

    from tvlars_fused import TVLARS, LARS, LAMB   # fused, drop-in torch.optim optimizers
    from tvlars_fused.reference import TVLARS     # the eager references they are checked against
"""
from . import reference
from .optimizer import LAMB, LARS, TVLARS
from .param_groups import lars_param_groups
from .schedule import phi

__all__ = ["TVLARS", "LARS", "LAMB", "lars_param_groups", "phi", "reference"]
__version__ = "0.1.0"
