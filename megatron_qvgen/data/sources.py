"""Which videos to encode and their captions: a ``.txt`` beside each video, or one CSV / TSV / JSONL table.

Table rows name the video by its path relative to the video folder (or its file name) in a column
``video``, ``path`` or ``file``, and the caption in ``caption``, ``text`` or ``prompt``. Captions are
UTF-8 text. A video whose caption is missing, not UTF-8 or only whitespace cannot become a sample (one
message each, naming the file); a caption that names no video is reported, since it usually means a
misspelt file name.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, List, Optional

from megatron_qvgen.data.errors import DatasetError
from megatron_qvgen.data.video_io import VIDEO_EXTENSIONS, VideoError

_PATH_COLUMNS = ("video", "path", "file")
_CAPTION_COLUMNS = ("caption", "text", "prompt")
CAPTION_SUFFIX = ".txt"


def list_videos(videos_dir: str) -> List[str]:
    """Video files under ``videos_dir`` as sorted relative paths (the order shards are made in)."""
    if not os.path.isdir(videos_dir):
        raise DatasetError(f"video folder {videos_dir} does not exist")
    found = []
    for root, _, files in os.walk(videos_dir):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), videos_dir))
    if not found:
        raise DatasetError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {videos_dir}")
    return sorted(found)


def _not_utf8(path: str, exc: UnicodeDecodeError) -> str:
    return (f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}): "
            "save it as UTF-8")


def load_caption_table(path: str) -> Dict[str, str]:
    """CSV / TSV (with a header) or JSONL -> {video name: caption}; a malformed table is an error naming the row."""
    if not path.lower().endswith((".jsonl", ".json", ".csv", ".tsv")):
        raise DatasetError(f"caption table {path} must be .csv, .tsv or .jsonl")
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"caption table {path} cannot be read: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError("caption table " + _not_utf8(path, exc)) from None
    if path.lower().endswith((".jsonl", ".json")):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{n}: not JSON ({exc})") from None
    else:
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = [(reader.line_num, row) for row in reader]
    table: Dict[str, str] = {}
    for n, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{n}: expected an object / a row with named columns")
        video = next((row[c] for c in _PATH_COLUMNS if row.get(c)), None)
        caption = next((row[c] for c in _CAPTION_COLUMNS if row.get(c) is not None), None)
        if not isinstance(video, str) or not isinstance(caption, str):
            raise DatasetError(f"{path}:{n}: needs a video column ({'/'.join(_PATH_COLUMNS)}) and a caption column "
                               f"({'/'.join(_CAPTION_COLUMNS)})")
        table[os.path.normpath(video)] = caption
    return table


def caption_for(videos_dir: str, relpath: str, table: Optional[Dict[str, str]]) -> str:
    """The caption of one video, stripped; VideoError (naming the file) when it is missing, not UTF-8 or empty."""
    if table is not None:
        name = next((n for n in (os.path.normpath(relpath), os.path.basename(relpath)) if n in table), None)
        if name is None:
            raise VideoError(f"{relpath}: no caption (no row of the caption table names it)")
        caption, source = table[name], f"its row ({name}) in the caption table"
    else:
        txt = os.path.splitext(relpath)[0] + CAPTION_SUFFIX
        try:
            with open(os.path.join(videos_dir, txt), "rb") as f:
                caption = f.read().decode("utf-8-sig")
        except FileNotFoundError:
            raise VideoError(f"{relpath}: no caption (no {txt} beside it; or pass a table with --captions)") from None
        except OSError as exc:
            raise VideoError(f"{relpath}: caption {txt} cannot be read: {exc}") from None
        except UnicodeDecodeError as exc:
            raise VideoError(f"{relpath}: caption " + _not_utf8(txt, exc)) from None
        source = txt
    caption = caption.strip()
    if not caption:
        raise VideoError(f"{relpath}: the caption is empty ({source} holds only whitespace)")
    return caption


def captions_without_video(videos_dir: str, videos: List[str], table: Optional[Dict[str, str]]) -> List[str]:
    """Table rows, or ``.txt`` files of the video folder, that name no video of ``videos``."""
    if table is not None:
        known = {os.path.normpath(v) for v in videos} | {os.path.basename(v) for v in videos}
        return sorted(name for name in table if name not in known)
    stems = {os.path.splitext(v)[0] for v in videos}
    orphans = []
    for root, _, files in os.walk(videos_dir):
        for name in files:
            if name.endswith(CAPTION_SUFFIX):
                rel = os.path.relpath(os.path.join(root, name), videos_dir)
                if rel[:-len(CAPTION_SUFFIX)] not in stems:
                    orphans.append(rel)
    return sorted(orphans)
