"""Procedural videos of moving shapes, and captions that say what moves where.

Every word of a caption (size, colour, shape, speed, direction, background) changes the pixels, so a
model trained on these learns to follow its text. Scenes are drawn from a numpy Generator: same seed,
same scene.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.15, 0.80, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10), "purple": (0.60, 0.20, 0.80), "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle")
# (dy, dx) in image coordinates, and how the caption says it.
DIRECTIONS = {"left": ((0.0, -1.0), "to the left"), "right": ((0.0, 1.0), "to the right"),
              "up": ((-1.0, 0.0), "up"), "down": ((1.0, 0.0), "down")}
SIZES = {"small": 0.14, "large": 0.24}          # radius, as a fraction of the shorter side
SPEEDS = {"slowly": 0.2, "quickly": 0.45}       # distance covered in the clip, fraction of the frame
BACKGROUNDS = {"black": (0.02, 0.02, 0.02), "gray": (0.45, 0.45, 0.45)}


@dataclass(frozen=True)
class MovingShape:
    shape: str
    colour: str
    size: str
    speed: str
    direction: str
    start: Tuple[float, float]   # centre (y, x) at the first frame, fractions of height and width

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moving {self.speed} {DIRECTIONS[self.direction][1]}"


@dataclass(frozen=True)
class Scene:
    objects: Tuple[MovingShape, ...]
    background: str

    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" on a {self.background} background"


def random_scene(rng: np.random.Generator, max_objects: int = 2) -> Scene:
    objects: List[MovingShape] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        size, speed = str(rng.choice(list(SIZES))), str(rng.choice(list(SPEEDS)))
        direction = str(rng.choice(list(DIRECTIONS)))
        (dy, dx), _ = DIRECTIONS[direction]
        radius, travel = SIZES[size], SPEEDS[speed]
        # Start where the whole path stays inside the frame.
        start = tuple(float(rng.uniform(radius + max(0.0, -d) * travel, 1 - radius - max(0.0, d) * travel))
                      for d in (dy, dx))
        objects.append(MovingShape(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))),
                                   size=size, speed=speed, direction=direction, start=start))
    return Scene(objects=tuple(objects), background=str(rng.choice(list(BACKGROUNDS))))


def render_scene(scene: Scene, frames: int, height: int, width: int, supersample: int = 4) -> np.ndarray:
    """float32 [frames, height, width, 3] in [0, 1], anti-aliased by supersampling."""
    hs, ws = height * supersample, width * supersample
    ys = (np.arange(hs, dtype=np.float32) + 0.5) / hs
    xs = (np.arange(ws, dtype=np.float32) + 0.5) / ws
    # Distances in units of the shorter side, so circles stay round in any aspect ratio.
    unit = min(height, width)
    yy = (ys * height / unit)[:, None]
    xx = (xs * width / unit)[None, :]
    video = np.empty((frames, hs, ws, 3), dtype=np.float32)
    for t in range(frames):
        tau = t / max(frames - 1, 1)
        canvas = np.empty((hs, ws, 3), dtype=np.float32)
        canvas[:] = BACKGROUNDS[scene.background]
        for obj in scene.objects:
            (dy, dx), _ = DIRECTIONS[obj.direction]
            travel = SPEEDS[obj.speed] * tau
            cy = (obj.start[0] + dy * travel) * height / unit
            cx = (obj.start[1] + dx * travel) * width / unit
            canvas[_mask(obj.shape, yy - cy, xx - cx, SIZES[obj.size] * min(height, width) / unit)] = COLOURS[obj.colour]
        video[t] = canvas
    return video.reshape(frames, height, supersample, width, supersample, 3).mean(axis=(2, 4))


def _mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dy) <= 0.85 * r) & (np.abs(dx) <= 0.85 * r)
    if shape == "triangle":  # apex up, base at 0.7 r below the centre
        depth = dy + r
        return (depth >= 0) & (dy <= 0.7 * r) & (np.abs(dx) <= depth * 0.6)
    raise ValueError(f"unknown shape {shape!r}")


# ------------------------------------------------------------------ reading a clip back (does a sample follow its caption?)
_CAPTION = re.compile(r"a (?P<size>small|large) (?P<colour>\w+) (?P<shape>circle|square|triangle) moving "
                      r"(?P<speed>slowly|quickly) (?P<direction>to the left|to the right|up|down)")
_BACKGROUND = re.compile(r"on a (?P<background>\w+) background")
_PHRASE_TO_DIRECTION = {phrase: name for name, (_, phrase) in DIRECTIONS.items()}
# Area of one shape as a share of (shorter side)^2: small <= 0.064 (circle), large >= 0.1 (triangle).
_LARGE_AREA = 0.08
READ_ATTRIBUTES = ("background", "colour", "size", "direction")


def caption_attributes(caption: str) -> Optional[Dict[str, str]]:
    """background, colour, size, direction of a one-object caption (None for other captions)."""
    objects = list(_CAPTION.finditer(caption))
    background = _BACKGROUND.search(caption)
    if len(objects) != 1 or background is None:
        return None
    o = objects[0]
    return {"background": background["background"], "colour": o["colour"], "size": o["size"],
            "direction": _PHRASE_TO_DIRECTION[o["direction"]]}


def read_clip(video: np.ndarray) -> Dict[str, Optional[str]]:
    """What a one-object clip [F, H, W, 3] in [0, 1] shows, read off the pixels: background (the border's median
    colour), the object's colour and size (pixels unlike the background) and its direction (centroid from the
    first to the last frame). An attribute that cannot be read is None."""
    frames, height, width, _ = video.shape
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1).reshape(-1, 3)
    bg_colour = np.median(border, axis=0)
    out: Dict[str, Optional[str]] = {"background": _nearest(bg_colour, BACKGROUNDS), "colour": None, "size": None,
                                     "direction": None}
    mask = np.linalg.norm(video - bg_colour, axis=-1) > 0.3
    if mask.sum() < frames:  # nothing that stands out from the background
        return out
    out["colour"] = _nearest(video[mask].mean(axis=0), COLOURS)
    area = mask.sum(axis=(1, 2)).mean() / min(height, width) ** 2
    out["size"] = "large" if area > _LARGE_AREA else "small"
    ys, xs = np.mgrid[0:height, 0:width]
    first, last = mask[0], mask[-1]
    if first.any() and last.any():
        dy = ys[last].mean() - ys[first].mean()
        dx = xs[last].mean() - xs[first].mean()
        if max(abs(dy), abs(dx)) >= 0.5:
            out["direction"] = ("down" if dy > 0 else "up") if abs(dy) > abs(dx) else ("right" if dx > 0 else "left")
    return out


def _nearest(colour: np.ndarray, table: Dict[str, Tuple[float, float, float]]) -> str:
    return min(table, key=lambda name: float(np.linalg.norm(colour - np.asarray(table[name]))))
