"""Read a clip for a video VAE: frames at the model's frame rate, resized to cover and centre-cropped.

Frames are taken at times k / fps from the start (the decoded frame nearest each time), so a 30 fps
source gives a 16 fps clip of the same speed. A clip that does not fit, or a file that does not
decode, raises :class:`VideoError` naming the file.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


class VideoError(Exception):
    """One video cannot become a sample; the message names the file and why."""


def read_clip(path: str, num_frames: int, height: int, width: int,
              fps: Optional[float] = None) -> Tuple[torch.Tensor, float]:
    """(float32 [3, num_frames, height, width] in [-1, 1], the clip's frame rate).

    ``fps=None`` takes consecutive frames at the source's rate.
    """
    frames, source_fps = _decode_frames(path, num_frames, fps)
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()  # [F, 3, h, w]
    video = resize_cover_crop(video, height, width)
    return (video / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous(), float(fps or source_fps)


def resize_cover_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 3, h, w] -> [F, 3, height, width]: scale to cover keeping the aspect ratio, crop the centre."""
    h, w = video.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        if size != (h, w):
            video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (video.shape[-2] - height) // 2, (video.shape[-1] - width) // 2
        video = video[..., top:top + height, left:left + width]
    return video.clamp(0, 255)


def _decode_frames(path: str, num_frames: int, fps: Optional[float]) -> Tuple[List[np.ndarray], float]:
    import av

    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"{path}: cannot open as a video ({exc})") from None
    try:
        if not container.streams.video:
            raise VideoError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else None
        chosen: List = []
        prev, prev_time, start = None, None, None
        try:
            for index, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else (index / rate if rate else float(index))
                start = t if start is None else start
                t -= start
                if fps is None:
                    chosen.append(frame)
                else:
                    # The frame nearest each target time (container timestamps are rounded).
                    while len(chosen) < num_frames and t >= len(chosen) / fps - 1e-6:
                        target = len(chosen) / fps
                        closer_before = prev is not None and target - prev_time < t - target
                        chosen.append(prev if closer_before else frame)
                prev, prev_time = frame, t
                if len(chosen) >= num_frames:
                    break
        except (av.FFmpegError, ValueError) as exc:
            raise VideoError(f"{path}: decoding failed after {len(chosen)} frames ({exc})") from None
        interval = 1.0 / rate if rate else 0.0
        if fps is not None and prev is not None:
            while len(chosen) < num_frames and len(chosen) / fps <= prev_time + interval / 2 + 1e-6:
                chosen.append(prev)
        if len(chosen) < num_frames:
            have = f"{prev_time + interval:.2f} s" if prev is not None else "no frames"
            need = f"{num_frames} frames at {fps:g} fps" if fps else f"{num_frames} frames"
            raise VideoError(f"{path}: too short ({have}), needs {need}")
        arrays = {}  # a frame repeated (source slower than fps) is converted once
        for frame in chosen[:num_frames]:
            if id(frame) not in arrays:
                arrays[id(frame)] = frame.to_ndarray(format="rgb24")
        if fps is None and not rate:
            raise VideoError(f"{path}: the container gives no frame rate; ask for one (fps)")
        return [arrays[id(frame)] for frame in chosen[:num_frames]], rate or 0.0
    finally:
        container.close()
