"""Which LAMB the examples compare against, chosen in this one place for every script in examples/.

- ``tvlars_fused.LAMB`` when the installed package has it (the project's own fused LAMB);
- otherwise ``pytorch_optimizer.Lamb`` from pytorch-optimizer, at the version pinned in
  examples/requirements.txt. Its defaults are used: betas (0.9, 0.999), eps 1e-6, no bias
  correction (LAMB paper v3), decoupled weight decay, weight norm clamped at 10 in the trust
  ratio, no gradient pre-normalisation. Another version can change the numbers (a change of
  version once moved LAMB's figure in the digits example by 0.3 points), so the scripts print the
  one they ran and warn when it is not the pinned one.

``make_lamb(params, lr, weight_decay)`` builds it; ``lamb_source()`` says which one it is (None when
neither is installed: the scripts then skip LAMB with a message).
"""
from __future__ import annotations

from typing import Optional

from pins import installed_version, pinned_versions

PYTORCH_OPTIMIZER_PIN = pinned_versions().get("pytorch-optimizer")


def _tvlars_fused():
    import tvlars_fused
    return tvlars_fused


def _pytorch_optimizer_version() -> Optional[str]:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return None
    return installed_version("pytorch_optimizer") or "unknown"


def uses_fused_lamb() -> bool:
    return hasattr(_tvlars_fused(), "LAMB")


def lamb_source() -> Optional[str]:
    """'tvlars_fused.LAMB (tvlars_fused X)', 'pytorch_optimizer.Lamb X' or None."""
    if uses_fused_lamb():
        return f"tvlars_fused.LAMB (tvlars_fused {getattr(_tvlars_fused(), '__version__', '?')})"
    version = _pytorch_optimizer_version()
    return None if version is None else f"pytorch_optimizer.Lamb {version}"


def lamb_warning() -> Optional[str]:
    """A line to print when the LAMB in use is pytorch-optimizer at another version than the pin."""
    if uses_fused_lamb():
        return None
    version = _pytorch_optimizer_version()
    if version is not None and version != PYTORCH_OPTIMIZER_PIN:
        return (f"note: pytorch-optimizer {version} is installed; the published numbers used "
                f"{PYTORCH_OPTIMIZER_PIN} (pip install pytorch-optimizer=={PYTORCH_OPTIMIZER_PIN}); "
                "LAMB's results may differ")
    return None


def make_lamb(params, lr: float, weight_decay: float):
    """The LAMB optimizer over params (see the module docstring for which one)."""
    if uses_fused_lamb():
        return _tvlars_fused().LAMB(params, lr=lr, weight_decay=weight_decay)
    try:
        import pytorch_optimizer
    except ImportError as exc:
        raise RuntimeError("LAMB needs tvlars_fused.LAMB or pytorch-optimizer "
                           f"(pip install pytorch-optimizer=={PYTORCH_OPTIMIZER_PIN})") from exc
    return pytorch_optimizer.Lamb(params, lr=lr, weight_decay=weight_decay)
