"""Singular values of every auxiliary product L R, for monitoring the rank decay.

sigma(L R)^2 are the eigenvalues of (L^T L)(R R^T) (r x r), so only two small Gram matrices per layer are
needed; the sharded one is summed over TP in one all-reduce for all layers, and the per-stage summaries
are summed over the pipeline group so that the logging rank reports the whole model.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist

from megatron_qvgen.quant import quant_linears


@torch.no_grad()
def aux_singular_value_summary(model_chunks) -> Dict[str, float]:
    from megatron.core import parallel_state as ps

    layers = [layer for layer in quant_linears(model_chunks) if layer.has_aux and layer.aux_rank > 0]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # sum sigma_max, sum sigma_min, layers
    if layers:
        rank = layers[0].aux_rank
        grams_l = torch.stack([(l.aux_L[:, :rank].double().T @ l.aux_L[:, :rank].double()) for l in layers])
        grams_r = torch.stack([(l.aux_R[:rank].double() @ l.aux_R[:rank].double().T) for l in layers])
        split_rows = torch.tensor([l._rows_split for l in layers], device=grams_l.device)
        tp_group = ps.get_tensor_model_parallel_group()
        if dist.get_world_size(tp_group) > 1:
            # column-parallel: L rows are split (sum G_L); row-parallel: R columns are split (sum G_R)
            local_l = torch.where(split_rows.view(-1, 1, 1), grams_l, torch.zeros_like(grams_l))
            local_r = torch.where(split_rows.view(-1, 1, 1), torch.zeros_like(grams_r), grams_r)
            dist.all_reduce(local_l, group=tp_group)
            dist.all_reduce(local_r, group=tp_group)
            grams_l = torch.where(split_rows.view(-1, 1, 1), local_l, grams_l)
            grams_r = torch.where(split_rows.view(-1, 1, 1), grams_r, local_r)
        # r x r per layer: on the CPU (CUDA's general eigensolver needs MAGMA)
        eig = torch.linalg.eigvals((grams_l @ grams_r).cpu()).real.clamp_min(0).sqrt()
        sigma = eig.sort(dim=-1, descending=True).values
        totals[0] = sigma[:, 0].sum()
        totals[1] = sigma[:, -1].sum()
        totals[2] = len(layers)
    totals = totals.to(device)
    dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    if totals[2] == 0:
        return {}
    return {"sigma_max_mean": float(totals[0] / totals[2]), "sigma_min_mean": float(totals[1] / totals[2])}
