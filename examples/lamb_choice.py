"""Which LAMB the examples compare against, chosen in this one place for every script in examples/.

- ``"tvlars_fused"`` (the default): the project's own fused ``tvlars_fused.LAMB`` with the LAMB
  paper's defaults (You et al. 2019, Algorithm 2, as apex FusedLAMB): betas (0.9, 0.999), eps 1e-6,
  bias-corrected moments (``bias_correction="moments"``), the weight decay added to the update
  before the trust ratio (``weight_decay_mode="update"``), no weight-norm clip, the trust ratio on
  every parameter (biases included, as in the runs recorded with pytorch-optimizer), no gradient
  pre-normalisation. The options are passed explicitly (``LAMB_OPTIONS``), so a change of the
  package's defaults cannot move the examples' numbers silently.
- ``"pytorch-optimizer"`` (a comparison only: ``--lamb pytorch-optimizer`` in the scripts):
  ``pytorch_optimizer.Lamb`` at the version pinned in examples/requirements.txt, with its defaults:
  betas (0.9, 0.999), eps 1e-6, no moment bias correction but the step scaled by 1/(1 - beta1^t),
  decoupled weight decay, the weight norm clamped at 10 in the trust ratio. It is different math
  (docs/SPEC.md, "LAMB": the tvlars_fused.LAMB options that reproduce it), so it needs its own
  learning rate. Another version can change the numbers (a change of version once moved LAMB's
  figure in the digits example by 0.3 points), so the scripts print the one they ran and warn when
  it is not the pinned one.

``use(which)`` picks one (``LAMB_CHOICES``); ``make_lamb(params, lr, weight_decay)`` builds it;
``lamb_source()`` says which one it is and with which options (None when it is not available: the
scripts then skip LAMB with a message, ``lamb_missing()``).
"""
from __future__ import annotations

from typing import Optional

from pins import installed_version, pinned_versions

PYTORCH_OPTIMIZER_PIN = pinned_versions().get("pytorch-optimizer")
LAMB_CHOICES = ("tvlars_fused", "pytorch-optimizer")
DEFAULT_LAMB = "tvlars_fused"
# tvlars_fused.LAMB's options in the examples: the paper's (Algorithm 2), spelled out
LAMB_OPTIONS = dict(betas=(0.9, 0.999), eps=1e-6, bias_correction="moments",
                    weight_decay_mode="update", weight_norm_clip=None)
_choice = DEFAULT_LAMB


def use(which: Optional[str]) -> str:
    """Select the LAMB of make_lamb() / lamb_source() (None: the default); returns the choice."""
    global _choice
    which = which or DEFAULT_LAMB
    if which not in LAMB_CHOICES:
        raise ValueError(f"unknown LAMB {which!r}: one of {LAMB_CHOICES}")
    _choice = which
    return which


def _tvlars_fused():
    import tvlars_fused
    return tvlars_fused


def _pytorch_optimizer_version() -> Optional[str]:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return None
    return installed_version("pytorch_optimizer") or "unknown"


def lamb_source() -> Optional[str]:
    """Which LAMB, at which version, with which options; None when it is not available."""
    if _choice == "tvlars_fused":
        if not hasattr(_tvlars_fused(), "LAMB"):
            return None
        o = LAMB_OPTIONS
        return (f"tvlars_fused.LAMB (tvlars_fused {getattr(_tvlars_fused(), '__version__', '?')}; "
                f"the paper's Algorithm 2: bias_correction={o['bias_correction']!r}, "
                f"weight_decay_mode={o['weight_decay_mode']!r}, betas {o['betas']}, "
                f"eps {o['eps']:g}, no weight-norm clip)")
    version = _pytorch_optimizer_version()
    return None if version is None else (
        f"pytorch_optimizer.Lamb {version} (its defaults: no moment bias correction, step "
        f"x 1/(1 - beta1^t), decoupled weight decay, weight norm clamped at 10, eps 1e-6)")


def lamb_missing() -> str:
    """Why lamb_source() is None, and what to install."""
    if _choice == "tvlars_fused":
        return "this tvlars_fused has no LAMB (install the package from this checkout)"
    return (f"pytorch-optimizer is not installed "
            f"(pip install pytorch-optimizer=={PYTORCH_OPTIMIZER_PIN})")


def make_lamb(params, lr: float, weight_decay: float):
    """The LAMB optimizer over params (see the module docstring for which one)."""
    if _choice == "tvlars_fused":
        tf = _tvlars_fused()
        if not hasattr(tf, "LAMB"):
            raise RuntimeError(lamb_missing())
        return tf.LAMB(params, lr=lr, weight_decay=weight_decay, **LAMB_OPTIONS)
    try:
        import pytorch_optimizer
    except ImportError as exc:
        raise RuntimeError(lamb_missing()) from exc
    return pytorch_optimizer.Lamb(params, lr=lr, weight_decay=weight_decay)
