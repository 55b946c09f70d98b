"""QAT column/row-parallel linears with sharded auxiliary low-rank factors.

Per TP shard: ``Y = F.linear(Qa(X), Qw(W) + (gamma * L) @ R, b)``. The quantised input and the effective
weight are handed to megatron's own linear function (``_forward_impl``), so its communication (TP
all-reduce / sequence-parallel all-gather and reduce-scatter) is untouched and the auxiliary path rides
on the layer's existing all-reduce: no extra communication in the forward.

Sharding: column-parallel holds W, s, z and L by output rows and replicates R; row-parallel holds W and
R by input columns and replicates L, s and z. Replicated tensors whose gradient differs per rank get it
summed over the TP group (see tp_reduce.sum_grad_over_group). Per-token activation ranges of a
row-parallel input and the weight quantizer's initial statistics are reduced over the TP group, so the
numerics do not depend on the TP size.
"""
from __future__ import annotations

import fnmatch
from typing import Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import nn

from megatron_qvgen.config import QuantConfig
from megatron_qvgen.quant.activation_quantizer import ActivationQuantizer
from megatron_qvgen.quant.context import current_quant_context
from megatron_qvgen.quant.distributed_svd import truncated_svd
from megatron_qvgen.quant.tp_reduce import group_size, sum_grad_over_group
from megatron_qvgen.quant.weight_quantizer import LSQPlusWeightQuantizer


def is_quantized_name(name: str, quant: Optional[QuantConfig]) -> bool:
    if quant is None:
        return False
    included = any(fnmatch.fnmatchcase(name, pat) for pat in quant.include)
    excluded = any(fnmatch.fnmatchcase(name, pat) for pat in quant.exclude)
    return included and not excluded


class _QuantLinearMixin:
    """What the column and row classes share; ``_layout`` says which tensors are split across TP."""

    _rows_split: bool  # column-parallel: output rows split across TP ranks

    def _setup_quant(self, quant: Optional[QuantConfig], name: str, out_rows: int, in_cols: int) -> None:
        self.quant_name = name
        self.quant = quant
        self.quantized = is_quantized_name(name, quant)
        if not self.quantized:
            return
        device, dtype = self.weight.device, self.weight.dtype
        # One dtype for every parameter of the layer: megatron's bf16 optimizer checkpoints only
        # all-float16 models (its sharded state dict maps parameter ids through the float16 groups).
        self.weight_quantizer = LSQPlusWeightQuantizer(out_rows, self.input_size, quant, device=device, dtype=dtype)
        self.act_quantizer = ActivationQuantizer(quant, device=device, dtype=dtype)
        if quant.aux_rank > 0:
            # Fixed r0-wide storage; the active rank lives in a (persisted) buffer and decays in place, so
            # parameter objects -- and megatron DDP's grad buffers -- stay put until rank 0 deletes them.
            dtype = self.weight.dtype
            self.aux_L = nn.Parameter(torch.zeros(out_rows, quant.aux_rank, dtype=dtype, device=device))
            self.aux_R = nn.Parameter(torch.zeros(quant.aux_rank, in_cols, dtype=dtype, device=device))
            self.register_buffer("aux_active_rank", torch.tensor(quant.aux_rank, dtype=torch.long, device=device))
            self._active_rank = quant.aux_rank  # host mirror: reading the buffer would sync the GPU every forward
        self._tag_tensor_parallel()
        # Persisted: a checkpoint records whether PTQ initialisation (clip search + SVD) has happened.
        self.register_buffer("quant_initialized", torch.zeros((), dtype=torch.bool, device=device))
        self._initialized = False  # host mirror (no GPU sync per forward)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_host_mirrors())

    def _tag_tensor_parallel(self) -> None:
        """megatron counts a parameter once per TP group in the grad norm (and reshards it) only if it
        carries ``tensor_model_parallel``: tag the quantizer tensors that are split like the weight."""
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        if self._rows_split:
            split = {self.weight_quantizer.scale: 0, self.weight_quantizer.zero_point: 0}
            if self.quant.aux_rank > 0:
                split[self.aux_L] = 0
        else:
            split = {self.aux_R: 1} if self.quant.aux_rank > 0 else {}
        for param, dim in split.items():
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)

    # ------------------------------------------------------------------ state
    @property
    def has_aux(self) -> bool:
        return self.quantized and getattr(self, "aux_L", None) is not None

    @property
    def aux_rank(self) -> int:
        """The active rank r (columns beyond it are zero and excluded from the forward)."""
        return self._active_rank if self.has_aux else 0

    def set_active_rank(self, rank: int) -> None:
        self.aux_active_rank.fill_(rank)
        self._active_rank = rank

    def _sync_host_mirrors(self) -> None:
        """After a checkpoint load: one read of the persisted buffers."""
        if not self.quantized:
            return
        self._initialized = bool(self.quant_initialized)
        if hasattr(self, "aux_active_rank"):
            self._active_rank = int(self.aux_active_rank)

    def mark_initialized(self) -> None:
        self.quant_initialized.fill_(True)
        self._initialized = True

    @property
    def _tp_group_if_split(self):
        return self.tp_group if group_size(self.tp_group) > 1 else None

    def aux_gamma(self) -> torch.Tensor:
        """gamma over the active rank: 1 for the kept columns, the context's gate u for the decaying last ones."""
        rank = self.aux_rank
        keep = self.quant.kept_rank(rank) if self.quant.rank_decay else rank
        gamma = torch.ones(rank, dtype=torch.float32, device=self.aux_L.device)
        if keep < rank:
            gate = current_quant_context().aux_gate
            if gate is None:
                raise RuntimeError(
                    f"{type(self).__name__} '{self.quant_name}' has decaying auxiliary columns but no rank-decay "
                    "gate is set: run the forward inside quant_context(aux_gate=schedule.gate_at(step))")
            gamma[keep:] = gate
        return gamma

    # ------------------------------------------------------------------ PTQ initialisation
    @torch.no_grad()
    def initialize_quantization(self) -> None:
        """MSE clip search of the weight quantizer, then L, R from the top-r SVD of W - Qw(W).

        Call once on a fresh run after the full-precision weights are loaded (the checkpoint of a
        resumed run already holds the trained values)."""
        if not self.quantized:
            return
        group = self._tp_group_if_split
        self.weight_quantizer.initialize(self.weight, row_group=None if self._rows_split else group)
        if self.has_aux:
            error = self.weight.float() - self.weight_quantizer.quantize_exact(self.weight)
            rank = self.aux_L.shape[1]
            l_local, r_local, _ = truncated_svd(error, rank, shard_dim=0 if self._rows_split else 1, group=group)
            self.aux_L.copy_(l_local)
            self.aux_R.copy_(r_local)
            self.set_active_rank(rank)
        self.mark_initialized()

    # ------------------------------------------------------------------ auxiliary factors
    def remove_aux(self) -> None:
        """Rank 0: delete L and R; the layer is then exactly one quantised matmul."""
        if not self.has_aux:
            return
        del self.aux_L
        del self.aux_R
        self.aux_L = None
        self.aux_R = None
        self.set_active_rank(0)

    # ------------------------------------------------------------------ forward
    def effective_weight(self, weight: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``Qw(W) + (gamma * L) @ R`` for this shard (float32 unless ``out_dtype``)."""
        group = self._tp_group_if_split
        aux_l = aux_r = None
        if self.has_aux and self.aux_rank > 0:
            rank = self.aux_rank
            aux_l = sum_grad_over_group(self.aux_L[:, :rank], None if self._rows_split else group).float()
            aux_l = aux_l * self.aux_gamma()
            aux_r = sum_grad_over_group(self.aux_R[:rank], group if self._rows_split else None)
        return self.weight_quantizer(weight, replicated_group=None if self._rows_split else group,
                                     aux_l=aux_l, aux_r=aux_r, out_dtype=out_dtype)

    def _quantized_forward_impl(self, input, weight, parent_impl, *args, **kwargs):
        if not self.quantized:
            return parent_impl(input, weight, *args, **kwargs)
        if not self._initialized:
            raise RuntimeError(f"{type(self).__name__} '{self.quant_name}' is not initialised: call "
                               "megatron_qvgen.quant.initialize_quantizers(model) after loading the weights")
        groups = current_quant_context().timestep_groups
        if groups is None:
            raise RuntimeError(f"{type(self).__name__} '{self.quant_name}' ran without timestep groups: run the "
                               "forward inside quant_context(timestep_groups=...)")
        if input.dim() < 2 or (groups.numel() != 1 and input.shape[-2] != groups.numel()):
            raise RuntimeError(f"{type(self).__name__} '{self.quant_name}': input {tuple(input.shape)} is not "
                               f"(..., batch={groups.numel()}, hidden) as the timestep groups require")
        group = self._tp_group_if_split
        xq = self.act_quantizer(input, groups, row_group=None if self._rows_split else group,
                                grad_group=group if self._act_grad_partial else None)
        return parent_impl(xq, self.effective_weight(weight, out_dtype=input.dtype), *args, **kwargs)

    # ------------------------------------------------------------------ checkpoint
    def _quant_sharded_state_dict(self, prefix, sharded_offsets, metadata, split_axis_map):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, split_axis_map, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )

    def extra_repr(self) -> str:
        if not self.quantized:
            return f"name={self.quant_name!r}, quantized=False"
        q = self.quant
        return f"name={self.quant_name!r}, W{q.weight_bits}A{q.act_bits}, aux_rank={self.aux_rank}"


class QuantColumnParallelLinear(_QuantLinearMixin, ColumnParallelLinear):
    """megatron's ColumnParallelLinear with QVGen fake quantisation and L (split rows) @ R (replicated)."""

    _rows_split = True

    def __init__(self, input_size: int, output_size: int, *args, quant: Optional[QuantConfig] = None,
                 name: str = "", **kwargs):
        super().__init__(input_size, output_size, *args, **kwargs)
        self._setup_quant(quant, name, out_rows=self.output_size_per_partition, in_cols=self.input_size)

    @property
    def _act_grad_partial(self) -> bool:
        # With sequence parallelism each rank quantises its own tokens; without it the linear's backward has
        # already all-reduced the input gradient, so the clip logits' gradient is complete on every rank.
        return self.sequence_parallel

    def _forward_impl(self, input, weight, *args, **kwargs):
        return self._quantized_forward_impl(input, weight, super()._forward_impl, *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        axes = {"weight": 0, "bias": 0, "weight_quantizer.scale": 0, "weight_quantizer.zero_point": 0, "aux_L": 0}
        return self._quant_sharded_state_dict(prefix, sharded_offsets, metadata, axes)


class QuantRowParallelLinear(_QuantLinearMixin, RowParallelLinear):
    """megatron's RowParallelLinear with QVGen fake quantisation and L (replicated) @ R (split columns)."""

    _rows_split = False

    def __init__(self, input_size: int, output_size: int, *args, quant: Optional[QuantConfig] = None,
                 name: str = "", **kwargs):
        super().__init__(input_size, output_size, *args, **kwargs)
        self._setup_quant(quant, name, out_rows=self.output_size, in_cols=self.input_size_per_partition)

    @property
    def _act_grad_partial(self) -> bool:
        return True  # each rank quantises its slice of every token

    def _forward_impl(self, input, weight, *args, **kwargs):
        return self._quantized_forward_impl(input, weight, super()._forward_impl, *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return self._quant_sharded_state_dict(prefix, sharded_offsets, metadata, {"weight": 1, "aux_R": 1})
