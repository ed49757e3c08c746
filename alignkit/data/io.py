"""Reading rows from JSONL files or saved HF dataset directories, with errors that say file and line.

Every row carries where it came from, for errors: `_line` (JSONL line) or `_row` (0-based index into a
dataset directory, a .json list or a hub split). LOCATION_KEYS names them; without_location drops them
before rows reach a trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.errors import UserError

LOCATION_KEYS = ("_line", "_row")


def _utf8(data: bytes, path: Path, first_line: int = 1) -> str:
    """`data` decoded as UTF-8; otherwise a UserError naming the line (counted from first_line) and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at column {column}); "
                        "save the file as UTF-8") from None


def read_jsonl(path: str | Path, *, what: str = "data") -> list[dict]:
    """All rows of a JSONL file; a malformed line is an error naming file:line (nothing is half-read)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} file not found: {path}")
    if path.is_dir():
        raise UserError(f"{what}: {path} is a directory, expected a .jsonl file")
    rows = []
    # Bytes, decoded line by line: a text-mode reader decodes in blocks, so its error would name no line.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            row["_line"] = lineno
            rows.append(row)
    return rows


def load_hub_rows(source: str, *, what: str = "data") -> list[dict]:
    """`hf:NAME[:SPLIT]` — a dataset from the Hugging Face hub (or its local cache), default split `train`."""
    import datasets

    name, _, split = source[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # the hub client raises many types; all mean "cannot get that dataset"
        raise UserError(f"{what}: cannot load {source}: {str(err).splitlines()[0]}") from None
    return _indexed(ds)


def _indexed(rows) -> list[dict]:
    """Rows of a dataset or JSON list, each with its index as `_row` (a non-object row is left for the
    format checks to name)."""
    return [{**row, "_row": i} if isinstance(row, dict) else row for i, row in enumerate(rows)]


def without_location(row: dict) -> dict:
    """The row without the keys that say where it came from."""
    return {k: v for k, v in row.items() if k not in LOCATION_KEYS}


def load_rows(source: str | Path, *, what: str = "data") -> list[dict]:
    """Rows from a .jsonl/.json file, a `datasets.save_to_disk` directory, or `hf:NAME[:SPLIT]`, each with
    its location (`_line` from JSONL, `_row` otherwise)."""
    if isinstance(source, str) and source.startswith("hf:"):
        return load_hub_rows(source, what=what)
    path = Path(source)
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            raise UserError(f"{what}: {path} is not a saved HF dataset directory (no dataset_info.json)")
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{what}: {path} has splits {list(ds)}, expected a 'train' split")
            ds = ds["train"]
        return _indexed(ds)
    if path.suffix == ".json":
        if not path.exists():
            raise UserError(f"{what} file not found: {path}")
        try:
            data = json.loads(_utf8(path.read_bytes(), path))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects")
        return _indexed(data)
    return read_jsonl(path, what=what)


def where(source: str | Path, row: dict) -> str:
    """`file:line` for a JSONL row, `dataset[index]` for a row of a dataset or JSON list, the source alone
    for rows that came from elsewhere (a label store)."""
    if "_line" in row:
        return f"{source}:{row['_line']}"
    return f"{source}[{row['_row']}]" if "_row" in row else str(source)
