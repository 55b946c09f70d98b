"""3D rotary position embedding over a (frames, height, width) token grid.

The head dimension is split into a time, a height and a width part; each part rotates consecutive
channel pairs (2i, 2i+1) by ``position * theta^(-2i/dim)`` of its own axis. Frequencies are built in
float64 (float32 where a model computes them so) and stored as float32 cos/sin tables of shape
[tokens, head_dim] whose entries are repeated for both members of a pair, so one ``apply_rotary`` serves
every model (Wan: integer positions; CogVideoX 5B: its own axis split and grid positions).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def wan_axis_dims(head_dim: int) -> Tuple[int, int, int]:
    """Wan's split of a head: height and width get 2*(d//6) channels each, time the rest."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def axis_frequencies(dim: int, positions: torch.Tensor, theta: float = 10000.0,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Angles [len(positions), dim // 2] of one axis, computed in ``dtype``."""
    if dim % 2:
        raise ValueError(f"a rotary axis needs an even number of channels, got {dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim))
    return torch.outer(positions.to(dtype), inv_freq)


def rope_3d(grid_positions: Sequence[torch.Tensor], axis_dims: Sequence[int], theta: float = 10000.0,
            dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [F*H*W, sum(axis_dims)] for tokens ordered frame-major (f, h, w).

    ``grid_positions`` are the 1-D positions along time, height and width. ``dtype`` is the precision
    of the angles (Wan: float64; CogVideoX computes its tables in float32, and so must we to match it).
    """
    pos_t, pos_h, pos_w = grid_positions
    nt, nh, nw = len(pos_t), len(pos_h), len(pos_w)
    angles = [axis_frequencies(d, p, theta, dtype) for d, p in zip(axis_dims, grid_positions)]
    grid = torch.cat([
        angles[0].view(nt, 1, 1, -1).expand(nt, nh, nw, -1),
        angles[1].view(1, nh, 1, -1).expand(nt, nh, nw, -1),
        angles[2].view(1, 1, nw, -1).expand(nt, nh, nw, -1),
    ], dim=-1).reshape(nt * nh * nw, -1)
    cos = grid.cos().repeat_interleave(2, dim=-1).float()
    sin = grid.sin().repeat_interleave(2, dim=-1).float()
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the channel pairs of the LAST ``len(cos)`` tokens of x [s, b, heads, head_dim].

    Leading tokens (CogVideoX's text in its joint sequence) pass through unrotated.
    """
    n = cos.shape[0]
    if n > x.shape[0]:
        raise ValueError(f"rotary tables cover {n} tokens but the sequence has {x.shape[0]}")
    head, tail = x[: x.shape[0] - n], x[x.shape[0] - n:]
    cos = cos[:, None, None, 0::2]
    sin = sin[:, None, None, 1::2]
    even, odd = tail[..., 0::2].float(), tail[..., 1::2].float()
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    rotated = rotated.to(x.dtype)
    return rotated if head.shape[0] == 0 else torch.cat((head, rotated), dim=0)
