"""CogVideoX's two kinds of video-token positions, computed exactly as diffusers computes them.

- 2B: a 3D sin-cos table ADDED to the patch embeddings (text tokens get none). Channels: a quarter for
  the frame index, then 3/8 for the column and 3/8 for the row (positions divided by the interpolation
  scales), each half sin, half cos; float64, cast to the activation dtype when added.
- 5B: 3D rotary embedding of q/k of the video tokens. Heads split 1/4 time, 3/8 height, 3/8 width;
  spatial positions are spread over the crop of the training grid (``sample_height/width`` / patch) that
  the actual grid maps to, as diffusers' CogVideoX pipeline does; float32 like diffusers.

Tables depend only on the token grid, so they are cached per (grid, device).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from megatron_qvgen.config import CogVideoXConfig
from megatron_qvgen.models.common.rope import rope_3d

Grid = Tuple[int, int, int]  # latent frames, rows, columns of patches


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim]: sin | cos of position * 10000^(-i / (dim/2)), in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = torch.outer(positions.to(torch.float64), omega)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_table(cfg: CogVideoXConfig, grid: Grid) -> torch.Tensor:
    """[frames * rows * cols, hidden] float64, tokens frame-major then row-major."""
    frames, rows, cols = grid
    dim = cfg.hidden_size
    spatial, temporal = 3 * dim // 4, dim // 4
    row_pos = torch.arange(rows, dtype=torch.float32) / cfg.spatial_interpolation_scale
    col_pos = torch.arange(cols, dtype=torch.float32) / cfg.spatial_interpolation_scale
    frame_pos = torch.arange(frames, dtype=torch.float32) / cfg.temporal_interpolation_scale
    col_emb = _sincos_1d(spatial // 2, col_pos).view(1, cols, -1).expand(rows, cols, -1)
    row_emb = _sincos_1d(spatial // 2, row_pos).view(rows, 1, -1).expand(rows, cols, -1)
    spatial_emb = torch.cat([col_emb, row_emb], dim=-1).reshape(1, rows * cols, spatial)
    frame_emb = _sincos_1d(temporal, frame_pos).view(frames, 1, temporal)
    table = torch.cat([frame_emb.expand(frames, rows * cols, temporal),
                       spatial_emb.expand(frames, rows * cols, spatial)], dim=-1)
    return table.reshape(frames * rows * cols, dim)


def crop_region(rows: int, cols: int, base_rows: int, base_cols: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """(top, left), (bottom, right) of the largest centred region of the base grid with the aspect of
    (rows, cols), rounded like diffusers' ``get_resize_crop_region_for_grid``."""
    if rows / cols > base_rows / base_cols:
        height, width = base_rows, int(round(base_rows / rows * cols))
    else:
        width, height = base_cols, int(round(base_cols / cols * rows))
    top, left = int(round((base_rows - height) / 2.0)), int(round((base_cols - width) / 2.0))
    return (top, left), (top + height, left + width)


def rotary_axis_dims(head_dim: int) -> Tuple[int, int, int]:
    return head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3


def rotary_tables(cfg: CogVideoXConfig, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [frames * rows * cols, head_dim] float32."""
    frames, rows, cols = grid
    (top, left), (bottom, right) = crop_region(rows, cols, cfg.sample_height // cfg.patch_size,
                                               cfg.sample_width // cfg.patch_size)
    pos_h = torch.linspace(top, bottom * (rows - 1) / rows, rows, dtype=torch.float32)
    pos_w = torch.linspace(left, right * (cols - 1) / cols, cols, dtype=torch.float32)
    pos_t = torch.linspace(0, frames * (frames - 1) / frames, frames, dtype=torch.float32)
    return rope_3d([pos_t, pos_h, pos_w], rotary_axis_dims(cfg.attention_head_dim), dtype=torch.float32)


class GridTables:
    """Tables of the last few grids seen, on the device they are used on."""

    def __init__(self, make: Callable[[Grid], object], keep: int = 4):
        self.make = make
        self.keep = keep
        self._cache: Dict[Tuple[Grid, torch.device], object] = {}

    def __call__(self, grid: Grid, device: torch.device):
        key = (tuple(grid), torch.device(device))
        if key not in self._cache:
            made = self.make(grid)
            tables = tuple(t.to(device) for t in made) if isinstance(made, tuple) else made.to(device)
            if len(self._cache) >= self.keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = tables
        return self._cache[key]
