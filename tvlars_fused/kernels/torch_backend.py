"""backend="torch": the bucket step (docs/SPEC.md) in plain torch ops over the flat buffers.

Portable (any device torch supports), deterministic, and a readable statement of what the Triton
and C++ kernels compute. It allocates bucket-sized temporaries, so it is the slow fused path.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import hyperparams as H
from ..buckets import SEG_END, SEG_FLAGS, SEG_GROUP, SEG_OFFSET, Bucket
from ..schedule import phi

NAME = "torch"
CHUNK_ELEMS = 4096
requirement = "any device"


def available(device: torch.device) -> bool:
    return True


def bucket_step(bucket: Bucket, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
    b = bucket
    keep = torch.ones((), dtype=torch.bool, device=b.device) if found_inf is None else (found_inf.reshape(()) == 0)
    if b.num_segments and b.numel:
        acc = b.acc_dtype
        seg = b.seg_table
        lengths = seg[:, SEG_END] - seg[:, SEG_OFFSET]
        tab = b.group_table[seg[:, SEG_GROUP]]
        flags = seg[:, SEG_FLAGS]

        def per_elem(x):
            return torch.repeat_interleave(x, lengths, output_size=b.numel)

        w = b.param_buf.to(acc)
        g = b.grad_buf.to(acc)
        if grad_scale is not None:
            g = g / grad_scale.reshape(()).to(acc)
        wd = tab[:, H.COL_WEIGHT_DECAY] * ((flags & H.FLAG_SKIP_WEIGHT_DECAY) == 0)
        d = g + per_elem(wd) * w

        wn = torch.segment_reduce(w * w, "sum", lengths=lengths, unsafe=True).sqrt()
        dn = torch.segment_reduce(d * d, "sum", lengths=lengths, unsafe=True).sqrt()
        wn = torch.minimum(wn, tab[:, H.COL_NORM_CLIP])
        dn = torch.minimum(dn, tab[:, H.COL_NORM_CLIP])
        ph = phi(b.step.reshape(()).to(acc), tab[:, H.COL_LMBDA], tab[:, H.COL_DELAY],
                 tab[:, H.COL_ALPHA], tab[:, H.COL_GAMMA_MIN])
        ph = torch.where(tab[:, H.COL_USE_PHI] != 0, ph, torch.ones_like(ph))
        adapt = ((flags & H.FLAG_SKIP_ADAPTATION) == 0) & (wn > 0) & (dn > 0)
        q = torch.where(adapt, tab[:, H.COL_ETA] * ph * wn / dn, torch.ones_like(wn))

        apply = (b.seg_active != 0) & keep
        new_stats = torch.stack([wn, dn, q, ph], dim=1)
        b.stats.copy_(torch.where(apply[:, None], new_stats, b.stats))

        lr = per_elem(tab[:, H.COL_LR])
        mom = per_elem(tab[:, H.COL_MOMENTUM])
        u = per_elem(q) * d
        s = b.state_buf.to(acc)
        s_new = mom * s + u
        w_new = w - lr * s_new
        paper = tab[:, H.COL_PAPER_FORM] != 0
        if any(g_row[H.COL_PAPER_FORM] for g_row in (b._rows or [])):
            paper_e = per_elem(paper)
            m_new = w - lr * u
            w_new = torch.where(paper_e, m_new + mom * (m_new - s), w_new)
            s_new = torch.where(paper_e, m_new, s_new)
        apply_e = per_elem(apply)
        b.param_buf.copy_(torch.where(apply_e, w_new, w))
        b.state_buf.copy_(torch.where(apply_e, s_new, s))
    b.step.add_(keep.to(b.step.dtype))
