"""QVGen quantization: bit widths, quantizer details, the auxiliary module and its rank decay.

Defaults are those of ../shared/QVGEN.md (the published implementation). Method presets for the
paper's ablations are built by :meth:`QuantConfig.for_method`; bit presets by :meth:`QuantConfig.preset`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

from megatron_qvgen.config.errors import ConfigError

METHODS = ("qvgen", "lsq", "qvgen_keep_aux", "decay_all")
# Bit widths supported end to end (fake-quant training, inference export, qvgen_kernels runtime); a test checks
# them against qvgen_kernels. Weights: the export packs two codes a byte and QuantizedLinear takes at most 4 bits.
# Activations: 8-bit codes at most (the runtime's Triton path up to 7 bits, its torch path at 8).
WEIGHT_BITS = (2, 3, 4)
ACT_BITS = (2, 3, 4, 5, 6, 7, 8)
BIT_PRESETS = {"w4a4": (4, 4), "w3a3": (3, 3), "w4a8": (4, 8)}
DECAY_MOMENTS = ("reset", "realign", "keep")   # megatron_qvgen/quant/decay_moments.py


@dataclass
class QuantConfig:
    # Which ablation this is; the fields below are what it means (set by for_method).
    method: str = "qvgen"
    weight_bits: int = 4
    act_bits: int = 4
    # Activation quantizer: per token, clip = rowrange * clip_ratio * sigmoid(logit[timestep group]).
    act_clip_ratio: float = 0.95
    act_clip_init: float = 0.95
    num_timestep_groups: int = 50
    # Weight quantizer (LSQ+): MSE clip search p = 1.00, 0.99, ... over grid * max_shrink candidates.
    weight_init: str = "mse"
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    lsq_grad_scaling: bool = True
    # Auxiliary module: W_eff = Qw(W) + (gamma * L) @ R, initialised by a rank-`aux_rank` SVD of W - Qw(W).
    aux_rank: int = 32
    # lambda: fraction of the current rank that decays within each phase.
    decay_fraction: float = 0.5
    # Rank decay on/off (off = the auxiliary module stays at full rank for the whole run).
    rank_decay: bool = True
    # Phase length T in steps; None = train.steps // number of phases (resolved by ExperimentConfig).
    decay_phase_steps: Optional[int] = None
    decay_anneal: str = "cosine"
    # What a boundary does to the Adam moments of the re-factored L and R: reset | realign | keep
    # (megatron_qvgen/quant/decay_moments.py; QVGEN.md asks for "re-align or reset").
    decay_moments: str = "reset"
    # Which linears are quantized, by fnmatch pattern on the module name (exclusions off by default).
    include: Tuple[str, ...] = ("*",)
    exclude: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"quant.method must be one of {METHODS}, got {self.method!r}")
        if type(self.weight_bits) is not int or self.weight_bits not in WEIGHT_BITS:
            raise ConfigError(f"quant.weight_bits must be one of {', '.join(map(str, WEIGHT_BITS))}, got "
                              f"{self.weight_bits!r}: the inference export packs two weight codes a byte and its "
                              "kernels take at most 4 bits")
        if type(self.act_bits) is not int or self.act_bits not in ACT_BITS:
            raise ConfigError(f"quant.act_bits must be an integer in [{ACT_BITS[0]}, {ACT_BITS[-1]}], got "
                              f"{self.act_bits!r}")
        if not 0.0 < self.act_clip_ratio <= 1.0:
            raise ConfigError(f"quant.act_clip_ratio must be in (0, 1], got {self.act_clip_ratio}")
        if not 0.0 < self.act_clip_init < 1.0:
            raise ConfigError(f"quant.act_clip_init must be in (0, 1) (it is a sigmoid), got {self.act_clip_init}")
        if self.num_timestep_groups < 1:
            raise ConfigError(f"quant.num_timestep_groups must be >= 1, got {self.num_timestep_groups}")
        if self.weight_init not in ("mse", "minmax"):
            raise ConfigError(f"quant.weight_init must be 'mse' or 'minmax', got {self.weight_init!r}")
        if not 0.0 < self.mse_max_shrink <= 1.0 or self.mse_grid < 1:
            raise ConfigError("quant.mse_grid must be >= 1 and quant.mse_max_shrink in (0, 1]")
        if self.aux_rank < 0:
            raise ConfigError(f"quant.aux_rank must be >= 0, got {self.aux_rank}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"quant.decay_fraction (lambda) must be in (0, 1], got {self.decay_fraction}")
        if self.decay_phase_steps is not None and self.decay_phase_steps < 1:
            raise ConfigError(f"quant.decay_phase_steps must be >= 1, got {self.decay_phase_steps}")
        if self.decay_anneal not in ("cosine", "linear"):
            raise ConfigError(f"quant.decay_anneal must be 'cosine' or 'linear', got {self.decay_anneal!r}")
        if self.decay_moments not in DECAY_MOMENTS:
            raise ConfigError(f"quant.decay_moments must be one of {DECAY_MOMENTS}, got {self.decay_moments!r}")
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)

    # ------------------------------------------------------------------ presets
    @classmethod
    def for_method(cls, method: str = "qvgen", bits: str = "w4a4", **overrides) -> "QuantConfig":
        """The paper's ablations: qvgen (default), lsq (no auxiliary module), qvgen_keep_aux (no decay),
        decay_all (lambda = 1). PTQ is step 0 of any of them."""
        if bits not in BIT_PRESETS:
            raise ConfigError(f"bit preset must be one of {sorted(BIT_PRESETS)}, got {bits!r}")
        w, a = BIT_PRESETS[bits]
        fields = dict(method=method, weight_bits=w, act_bits=a)
        if method == "lsq":
            fields.update(aux_rank=0, rank_decay=False)
        elif method == "qvgen_keep_aux":
            fields.update(rank_decay=False)
        elif method == "decay_all":
            fields.update(decay_fraction=1.0)
        elif method != "qvgen":
            raise ConfigError(f"quant.method must be one of {METHODS}, got {method!r}")
        fields.update(overrides)
        return cls(**fields)

    def with_(self, **changes) -> "QuantConfig":
        return replace(self, **changes)

    # ------------------------------------------------------------------ derived
    @property
    def has_aux(self) -> bool:
        return self.aux_rank > 0

    def kept_rank(self, rank: int) -> int:
        """Columns that stay at gamma = 1 during a phase at `rank` (and survive its boundary)."""
        return int(math.floor(rank * (1.0 - self.decay_fraction) + 1e-9))

    def rank_sequence(self) -> Tuple[int, ...]:
        """Ranks of the successive phases, ending with 0: (32, 16, 8, 4, 2, 1, 0) by default."""
        if not self.has_aux:
            return (0,)
        ranks = [self.aux_rank]
        while ranks[-1] > 0:
            ranks.append(self.kept_rank(ranks[-1]))
        return tuple(ranks)

    @property
    def num_decay_phases(self) -> int:
        return len(self.rank_sequence()) - 1
