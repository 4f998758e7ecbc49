"""Files written whole or not at all: a temporary file beside the target, then one rename, so a
reader (or a run killed mid-write) sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomically(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data, indent: int = 2) -> None:
    write_text_atomically(path, json.dumps(data, indent=indent))
