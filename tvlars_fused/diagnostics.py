"""Turn the fused optimizers' layer_stats() into plain floats for any logger (one transfer per
device, at the moment you choose to log)."""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch


def layer_stats_dict(optimizer, named_parameters: Iterable[Tuple[str, torch.Tensor]],
                     prefix: str = "") -> Dict[str, float]:
    """{"<prefix><param name>/<stat>": value} for every named parameter the optimizer updates.

    `named_parameters` is e.g. model.named_parameters(); the stats are those of the last step that
    updated each parameter (see TVLARS.layer_stats), named by `optimizer.algorithm.stat_names`."""
    stats = optimizer.layer_stats()
    names = [(n, p) for n, p in named_parameters if p in stats]
    by_device: Dict[torch.device, list] = {}
    for n, p in names:
        by_device.setdefault(stats[p].device, []).append((n, stats[p]))
    out: Dict[str, float] = {}
    for items in by_device.values():
        rows = torch.stack([s for _, s in items]).double().cpu().tolist()
        for (n, _), row in zip(items, rows):
            for stat, v in zip(optimizer.algorithm.stat_names, row):
                out[f"{prefix}{n}/{stat}"] = v
    return out
