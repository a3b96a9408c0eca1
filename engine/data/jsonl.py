"""Reading doc-QA JSONL with errors that name the file, the line and the field."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file or row is malformed; the message names file, line and field."""


def read_docqa_jsonl(path: str | Path, required: tuple[str, ...] = ("context", "question"),
                     prompt_ok: bool = False) -> list[dict[str, Any]]:
    """Rows of {id, context, question, answers?}. `id` defaults to '<file stem>-<line>'.
    prompt_ok: a row may give a pre-rendered `prompt` string instead of the required fields."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for lineno, line in enumerate(jsonl_lines(read_text(path)), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        if prompt_ok and "prompt" in row:
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise DataError(f"{path}:{lineno}: field 'prompt' must be a non-empty string")
        else:
            for key in required:
                if not isinstance(row.get(key), str):
                    got = "missing" if key not in row else f"{type(row[key]).__name__}"
                    alt = " (or give a pre-rendered 'prompt')" if prompt_ok else ""
                    raise DataError(f"{path}:{lineno}: field {key!r} must be a string ({got}){alt}")
        row.setdefault("id", f"{path.stem}-{lineno}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def replace_text(path: Path, text: str) -> None:
    """`text` written aside (a name of this process's own) and renamed into place: a kill leaves
    the old file or the new one, whole, and processes writing the same file at once do not
    collide."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_text(path: Path) -> str:
    """A data file's text: UTF-8, a leading byte-order mark dropped; other bytes are named by
    file and line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file "
                        f"as UTF-8") from None


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split at "\n" only (a trailing "\r" dropped). str.splitlines
    also splits at U+2028, U+2029 and U+0085, which JSON written with ensure_ascii=False keeps
    unescaped inside its strings."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
