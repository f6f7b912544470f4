"""Read data files into records, each tagged with where it came from ("file:line") for error messages.

JSONL, JSON (a list of objects, or {"data": [...]}), CSV, Parquet, or a hub dataset name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge.errors import DataError

SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


@dataclass
class Record:
    data: dict
    where: str  # "path:line" (JSONL, CSV) or "path[index]" (JSON, Parquet, hub)


def read_records(source: str, *, split: str = "train", limit: int | None = None) -> list[Record]:
    path = Path(source)
    if path.suffix.lower() in SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"data file {source} not found", fix="check the path in data.train / data.eval")
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}", fix="use .jsonl, .json, .csv or .parquet")
        records = reader(path, limit)
    else:
        records = _read_hub(source, split, limit)
    if not records:
        raise DataError(f"{source}: no examples found (the file is empty)", fix="add examples, one JSON object per line")
    return records


def _read_jsonl(path: Path, limit: int | None) -> list[Record]:
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark (Windows editors) is fine
            except UnicodeDecodeError as exc:
                raise DataError(f"not valid UTF-8 (byte {exc.start})", where=where, fix="re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", where=where,
                                fix="each line must be one complete JSON object") from None
            except RecursionError:  # json gives up on very deep nesting with RecursionError, not a decode error
                raise DataError("JSON nested too deeply to read", where=where,
                                fix="each line must be one JSON object of messages or fields") from None
            if not isinstance(value, dict):
                raise DataError(f"expected a JSON object, got {type(value).__name__}", where=where,
                                fix='each line must look like {"messages": [...]} or {"prompt": ..., "completion": ...}')
            records.append(Record(value, where))
            if limit and len(records) >= limit:
                break
    return records


def _read_json(path: Path, limit: int | None) -> list[Record]:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8", where=str(path), fix="re-save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON: {exc.msg}", where=f"{path}:{exc.lineno}", fix="fix the JSON syntax") from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", where=str(path), fix="fix the JSON structure") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError("expected a JSON list of objects", where=str(path), fix="use [ {...}, {...} ] or JSONL")
    records = []
    for i, item in enumerate(value[:limit] if limit else value):
        if not isinstance(item, dict):
            raise DataError(f"expected an object, got {type(item).__name__}", where=f"{path}[{i}]")
        records.append(Record(item, f"{path}[{i}]"))
    return records


def _read_csv(path: Path, limit: int | None) -> list[Record]:
    import csv

    records = []
    csv.field_size_limit(2**31 - 1)  # a long example is data, not an error (the default limit is 128 KiB)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            # A quoted cell may span lines: a record is located at its first (non-blank) line, not where it ends.
            starts: list[int] = []
            numbered = _note_record_starts(handle, starts)
            reader = csv.DictReader(numbered)
            _ = reader.fieldnames  # reads the header line(s)
            starts.clear()
            for row in reader:
                where = f"{path}:{starts[-1] if starts else reader.line_num}"
                starts.clear()
                if None in row:  # more cells than the header has columns
                    raise DataError(f"{len(reader.fieldnames or []) + len(row[None])} cells, but the header has "
                                    f"{len(reader.fieldnames or [])} columns", where=where,
                                    fix="quote cells that contain commas, or fix the header")
                records.append(Record(dict(row), where))
                if limit and len(records) >= limit:
                    break
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8", where=str(path), fix="re-save the file as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"malformed CSV: {exc}", where=str(path), fix="check quoting and line endings") from None
    return records


def _note_record_starts(handle, starts: list[int]):
    """The file's lines; when `starts` is empty (the caller clears it after each record), the number of the next
    non-blank line outside a quoted cell is put in it: where the next record begins."""
    in_quotes = False
    for number, line in enumerate(handle, start=1):
        if not in_quotes and line.strip() and not starts:
            starts.append(number)
        in_quotes ^= line.count('"') % 2 == 1  # an odd number of quotes opens or closes a multi-line cell
        yield line


def _read_parquet(path: Path, limit: int | None) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"cannot read Parquet: {exc}", where=str(path)) from None
    rows = rows[:limit] if limit else rows
    return [Record(row, f"{path}[{i}]") for i, row in enumerate(rows)]


def _read_hub(name: str, split: str, limit: int | None) -> list[Record]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many types when offline or the name is wrong
        known = ""
        if "split" in str(exc).lower() or type(exc).__name__ == "ValueError":  # e.g. "Unknown split 'test'"
            known = f"; the split {split!r} may not exist (set data.split / data.eval_split to one it has)"
        raise DataError(
            f"{name!r} is not a local file and could not be loaded as a hub dataset, split {split!r} "
            f"({type(exc).__name__}){known}",
            where="data.train",
            fix="check the path; local files must end in .jsonl, .json, .csv or .parquet",
        ) from None
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [Record(dict(row), f"{name}[{i}]") for i, row in enumerate(dataset)]
