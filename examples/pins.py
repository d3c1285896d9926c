"""The versions pinned in examples/requirements.txt, and a report of the installed ones.

The scripts in examples/ print ``version_report()`` at start, so every result states what produced
it, and a warning for each package whose installed version is not the pinned one.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

REQUIREMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements.txt")


def pinned_versions(path: str = REQUIREMENTS) -> Dict[str, str]:
    """{package: version} from the `name==version` lines of requirements.txt; a commented
    `# torch==X` line counts too (torch is pinned there only as a comment, so that pip never
    touches it)."""
    pins: Dict[str, str] = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"^\s*#?\s*([A-Za-z0-9_.\-]+)==([^\s#]+)\s*(#.*)?$", line)
            if m:
                pins[m.group(1).lower()] = m.group(2)
    return pins


def installed_version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_report(packages: Iterable[str]) -> Tuple[str, List[str]]:
    """("torch 2.13.0, scikit-learn 1.9.1, ...", [warnings for versions that differ from the pins])."""
    pins = pinned_versions()
    parts, warnings = [], []
    for pkg in packages:
        have = installed_version(pkg)
        if pkg == "torch":   # a local build suffix (+cpu, +cu128) is the same release
            import torch
            have = torch.__version__
        parts.append(f"{pkg} {have or 'not installed'}")
        want = pins.get(pkg.lower())
        if have is not None and want is not None and have.split("+")[0] != want:
            warnings.append(f"note: {pkg} {have} is installed; the published numbers used {pkg}=={want} "
                            f"(examples/requirements.txt); results may differ")
    return ", ".join(parts), warnings
