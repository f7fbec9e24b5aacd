"""Corpus file formats: every record of a source, from any resume point, as (where, record,
position after it, line after it). JSONL (seeking to a byte offset), JSONL.zst (concatenated zstd
frames, streamed; a cut frame is an error), Parquet and `datasets` folders (row indices, one row at a
time where a string is not UTF-8), and text (the whole file is one record, a TextFile read a window
at a time, never whole). A FIFO or a device is refused by name before anything opens it. A record that cannot be
parsed comes as a CorpusError in its place, so on_bad_record=skip can count it; mol.corpora renders
and packs what these readers yield.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
from pathlib import Path
from typing import Iterator

from .config import SourceConfig, expand_path, special_file_kind
from .errors import MolError


class CorpusError(MolError, ValueError):
    """A bad input record; the message names the file and line."""


def check_source_path(path: Path) -> None:
    """Refuse a FIFO, device or socket as a source (mol.config refuses it in a config; this guards
    the calls that take a SourceConfig directly). A missing path is the callers' own error."""
    kind = special_file_kind(path)
    if kind:
        raise CorpusError(f"{path}: is {kind}, not a regular file; a source must be a file or a datasets folder")


def detect_format(path: Path, fmt: str) -> str:
    check_source_path(path)
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    if name.endswith(".jsonl.zst") or name.endswith(".json.zst"):
        return "jsonl.zst"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".md")):
        return "text"
    raise CorpusError(f"{path}: cannot tell the format from the name; set format: jsonl|jsonl.zst|parquet|datasets|text")


class Where:
    """A record's location for error messages: `file:line` (JSONL), `file:row N` (tables).

    A JSONL segment entered in the middle does not know its line numbers; the number is counted
    from the byte offset only when a message needs it."""

    __slots__ = ("path", "line", "offset", "row")

    def __init__(self, path: Path, line: int | None = None, offset: int = 0, row: int | None = None):
        self.path, self.line, self.offset, self.row = path, line, offset, row

    def __str__(self) -> str:
        if self.row is not None:
            return f"{self.path}:row {self.row}"
        if self.line is None:
            n, left = 0, self.offset
            with open(self.path, "rb") as f:
                while left > 0 and (chunk := f.read(min(left, 1 << 22))):
                    n += chunk.count(b"\n")
                    left -= len(chunk)
            self.line = n + 1
        return f"{self.path}:{self.line}"

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


def table_rows(path: Path, fmt: str) -> int:
    if fmt == "parquet":
        return _open_parquet(path).metadata.num_rows
    return len(_open_dataset(path))


def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None


def _open_dataset(path: Path):
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise CorpusError(f"{path}: not a datasets folder saved with save_to_disk ({e})") from None
    if hasattr(ds, "keys") and not hasattr(ds, "features"):
        raise CorpusError(f"{path}: is a DatasetDict ({list(ds.keys())}); point at one split's folder")
    return ds


def _parse_json_line(raw: bytes, where: Where) -> object:
    """A bad line comes back as a CorpusError (not raised) so on_bad_record=skip can count it. The
    line's end of line stays on (JSON whitespace): stripping it would copy a 200 MB line once more."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return CorpusError(f"{where}: invalid UTF-8 at byte {e.start}")
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return CorpusError(f"{where}: invalid JSON ({e.msg}; column {e.colno})")


def _json_line(path: Path, raw: bytes, pos: int, line: int | None):
    """One JSONL line that starts at `pos` (its line number `line`, None when unknown): the reader's
    item (None for a blank line), then the position and line number after it."""
    where = Where(path, line, pos)
    pos, line = pos + len(raw), (line + 1 if line is not None else None)
    blank = not raw or raw.isspace()  # not raw.strip(): a copy of the line
    return ((where, _parse_json_line(raw, where), pos, line) if not blank else None), pos, line


# A reader yields (where, record, position after it, line after it); a record that cannot be
# parsed comes as a CorpusError in place of the record. Positions are what a resume seeks to.

def _jsonl_records(path: Path, start: int, end: int | None, line: int | None, fresh: bool):
    with open(path, "rb") as f:
        pos = start
        if fresh and start > 0:  # a segment owns the lines that START in [start, end)
            f.seek(start - 1)
            pos = start - 1 + len(f.readline())
            line = None
        else:
            f.seek(start)
        while end is None or pos < end:
            raw = f.readline()
            if not raw:
                return
            item, pos, line = _json_line(path, raw, pos, line)
            del raw  # the line's bytes are not kept while its record is packed
            if item:
                yield item


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a file of concatenated zstd frames, streamed. zstandard's
    stream_reader ends quietly where a file was cut inside a frame, so every record after the cut
    would be lost without a word; here that end is an EOFError, as gzip and bz2 raise for a cut
    stream. A cut exactly between two frames leaves a valid shorter file: nothing can tell."""

    def __init__(self, fh, read_size: int = 1 << 14):
        # small reads bound memory: a decompressobj returns all it decodes, and JSONL can shrink 50x
        import zstandard

        self._fh, self._read_size, self._dctx = fh, read_size, zstandard.ZstdDecompressor()
        self._frame, self._begun = self._dctx.decompressobj(), False
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._out:
            rest = b""
            if self._frame.eof:  # a decompressobj decodes one frame; the next starts in what it left
                rest = self._frame.unused_data
                self._frame, self._begun = self._dctx.decompressobj(), False
            data = rest or self._fh.read(self._read_size)
            if not data:
                if self._begun:
                    raise EOFError
                return 0
            self._begun = True
            self._out = memoryview(self._frame.decompress(data))
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def _jsonl_zst_records(path: Path, start: int, line: int | None):
    import zstandard

    with open(path, "rb") as raw:
        pos = start
        try:
            stream = io.BufferedReader(_ZstdFrames(raw), 1 << 20)
            left = start  # a compressed stream cannot seek: decompress and drop what finished shards hold
            while left > 0 and (chunk := stream.read(min(left, 1 << 22))):
                left -= len(chunk)
            for raw_line in stream:
                item, pos, line = _json_line(path, raw_line, pos, line)
                del raw_line
                if item:
                    yield item
        except zstandard.ZstdError as e:
            raise CorpusError(f"{path}: not a valid zstd stream ({e})") from None
        except EOFError:
            # the file, not a record, is bad: on_bad_record=skip must not turn it into a shorter corpus
            read = f"{line - 1} complete lines" if line is not None else f"{pos} decompressed bytes"
            raise CorpusError(f"{path}: the zstd stream ends in the middle of a frame (truncated file?) "
                              f"after {read}") from None


def _arrow_row(row, where: Where) -> dict | CorpusError:
    """A one-row Arrow table as a dict, or the error naming the column whose string is not UTF-8.
    Arrow checks a string's UTF-8 only when it converts it (a foreign Parquet writer may store any
    bytes), and then fails the whole batch: a row at a time finds the record to blame."""
    rec = {}
    for name in row.column_names:
        try:
            rec[name] = row.column(name)[0].as_py()
        except UnicodeDecodeError as e:
            return CorpusError(f"{where}: invalid UTF-8 in column {name!r} (byte {e.start} of a string)")
    return rec


def _parquet_records(path: Path, start: int, end: int | None):
    pf = _open_parquet(path)
    first, groups = 0, []
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if first + n > start and (end is None or first < end):
            groups.append(g)
        if not groups:
            first += n
    row = first
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups):
        try:
            recs = batch.to_pylist()
        except UnicodeDecodeError:
            recs = [_arrow_row(batch.slice(j, 1), Where(path, row=row + j + 1)) for j in range(batch.num_rows)]
        for rec in recs:
            row += 1
            if row <= start:
                continue
            if end is not None and row > end:
                return
            yield Where(path, row=row), rec, row, None


def _dataset_records(path: Path, start: int, end: int | None):
    ds = _open_dataset(path)
    stop = len(ds) if end is None else min(end, len(ds))
    for a in range(start, stop, 1024):
        b = min(a + 1024, stop)
        try:
            cols = ds[a:b]
        except UnicodeDecodeError:  # as in Parquet: find the row, and its column
            for i in range(a, b):
                where = Where(path, row=i + 1)
                try:
                    rec = ds[i]
                except UnicodeDecodeError:
                    rec = _arrow_row(ds.with_format("arrow")[i:i + 1], where)
                yield where, rec, i + 1, None
            continue
        names = list(cols)
        for j in range(len(cols[names[0]]) if names else 0):
            yield Where(path, row=a + j + 1), {n: cols[n][j] for n in names}, a + j + 1, None


TEXT_READ_BYTES = 1 << 20  # a text file is read (and hashed, and checked) this many bytes at a time


class TextFile:
    """A `.txt`/`.md` source's one document, already checked (UTF-8, not blank) and hashed, read a
    window at a time from a byte offset, never whole: a 1 GB book dump costs what a 1 MB one does.
    mol.corpora cuts the windows into pieces and tokenizes them one by one."""

    def __init__(self, path: Path, size: int, digest: bytes):
        self.path, self.size, self.digest = path, size, digest

    def window(self, offset: int, n: int) -> tuple[str, bool]:
        """The text from byte `offset` (a character boundary) on, at most `n` bytes of it (n >= 4;
        a character cut by the n-th byte is left to the next window), and whether it is the rest."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(n)
        last = offset + len(data) >= self.size
        try:
            return codecs.utf_8_decode(data, "strict", last)[0], last
        except UnicodeDecodeError as e:  # checked before: the file changed since
            raise CorpusError(f"{self.path}: invalid UTF-8 at byte {offset + e.start} "
                              f"(the file changed while it was read)") from None

    @staticmethod
    def advance(offset: int, piece: str) -> int:
        """The byte offset after `piece`, read from `offset`."""
        return offset + len(piece.encode("utf-8"))

    def read(self) -> str:
        """The whole text (small files and tests; the packer never calls this)."""
        return self.window(0, max(self.size, 4))[0]


def _scan_text_file(path: Path) -> TextFile | CorpusError:
    """One pass over a text file, TEXT_READ_BYTES at a time: its sha256 (the held-out split's hash
    of the text is the hash of its UTF-8, i.e. of the file), its UTF-8 (the error names the line; the
    whole file is checked before any of it is packed, as when it was read whole) and that it is not
    blank (a bad record, as an empty `text` field is)."""
    h, carry, done, lines, blank = hashlib.sha256(), b"", 0, 0, True
    with open(path, "rb") as f:
        while True:
            block = f.read(TEXT_READ_BYTES)
            h.update(block)
            data = carry + block
            try:
                text, used = codecs.utf_8_decode(data, "strict", not block)
            except UnicodeDecodeError as e:
                line = lines + data[:e.start].count(b"\n") + 1
                raise CorpusError(f"{path}:{line}: invalid UTF-8 at byte {done + e.start}") from None
            blank = blank and (not text or text.isspace())
            lines, done, carry = lines + data[:used].count(b"\n"), done + used, data[used:]
            if not block:
                break
    if blank:
        return CorpusError(f"{Where(path, 1)}: field 'text' is empty")
    return TextFile(path, done, h.digest())


def _text_records(path: Path, start: int):
    size = path.stat().st_size
    if start >= size:
        return
    doc = _scan_text_file(path)
    yield Where(path, 1), (doc if isinstance(doc, CorpusError) else {"text": doc}), size, None


def read_records(src: SourceConfig, start: int = 0, end: int | None = None, line: int | None = 1,
                 fresh: bool = True) -> Iterator[tuple[Where, object, int, int | None]]:
    """Records of a source from position `start` (a segment's start when `fresh`, else a resume
    point) up to `end`: (where, record, position after it, line after it)."""
    path = expand_path(src.path)
    if not path.exists():
        raise CorpusError(f"{path}: source file does not exist (corpus {src.corpus}, subset {src.subset})")
    fmt = detect_format(path, src.format)  # refuses a FIFO or a device first
    if fmt == "jsonl":
        return _jsonl_records(path, start, end, line, fresh)
    if fmt == "jsonl.zst":
        return _jsonl_zst_records(path, start, line)
    if fmt == "parquet":
        return _parquet_records(path, start, end)
    if fmt == "datasets":
        return _dataset_records(path, start, end)
    if fmt == "text":
        return _text_records(path, start)
    raise CorpusError(f"{path}: unknown format {fmt!r}")


def iter_records(src: SourceConfig) -> Iterator[tuple[Where, object]]:
    """Every record of a source: (location, record or CorpusError)."""
    for where, rec, _, _ in read_records(src):
        yield where, rec
