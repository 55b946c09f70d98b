"""Which videos to encode and their captions: a ``.txt`` beside each video, or one CSV / JSONL table.

Table rows name the video by its path relative to the video folder (or its file name) in a column
``video``, ``path`` or ``file``, and the caption in ``caption``, ``text`` or ``prompt``.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional

from megatron_qvgen.data.video_io import VIDEO_EXTENSIONS

_PATH_COLUMNS = ("video", "path", "file")
_CAPTION_COLUMNS = ("caption", "text", "prompt")


def list_videos(videos_dir: str) -> List[str]:
    """Video files under ``videos_dir`` as sorted relative paths (the order shards are made in)."""
    if not os.path.isdir(videos_dir):
        raise ValueError(f"video folder {videos_dir} does not exist")
    found = []
    for root, _, files in os.walk(videos_dir):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), videos_dir))
    return sorted(found)


def load_caption_table(path: str) -> Dict[str, str]:
    """CSV (with a header) or JSONL -> {video name: caption}; a malformed table is an error naming the row."""
    table: Dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.lower().endswith((".jsonl", ".json")):
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append((n, json.loads(line)))
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
            elif path.lower().endswith((".csv", ".tsv")):
                reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
                rows = [(n, row) for n, row in enumerate(reader, 2)]
            else:
                raise ValueError(f"caption table {path} must be .csv, .tsv or .jsonl")
    except OSError as exc:
        raise ValueError(f"caption table {path} cannot be read: {exc}") from None
    for n, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected an object / a row with named columns")
        video = next((row[c] for c in _PATH_COLUMNS if row.get(c)), None)
        caption = next((row[c] for c in _CAPTION_COLUMNS if row.get(c) is not None), None)
        if not isinstance(video, str) or not isinstance(caption, str):
            raise ValueError(f"{path}:{n}: needs a video column ({'/'.join(_PATH_COLUMNS)}) and a caption column "
                             f"({'/'.join(_CAPTION_COLUMNS)})")
        table[os.path.normpath(video)] = caption
    return table


def caption_for(videos_dir: str, relpath: str, table: Optional[Dict[str, str]]) -> Optional[str]:
    if table is not None:
        for name in (os.path.normpath(relpath), os.path.basename(relpath)):
            if name in table:
                return table[name]
        return None
    txt = os.path.join(videos_dir, os.path.splitext(relpath)[0] + ".txt")
    try:
        with open(txt, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
