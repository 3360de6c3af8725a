"""Document sources: the Python standard library, a folder of text files, or a JSONL file.

Every source yields ``(doc_id, text)`` pairs in an order that depends only on the doc ids
(sorted by a stable hash), never on the filesystem's listing order, so the same config
reads the same documents on every machine. The hash order also shuffles documents, so a
``max_bytes`` prefix is a sample of the whole source rather than its first folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from dsv3_train.config import ConfigError, DataConfig

_SOURCE_HELP = "give a folder of text files, a .jsonl file with a 'text' field, or 'stdlib'"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stable_hash(text: str, salt: str = "") -> int:
    """A 64-bit hash that is the same in every process (unlike the salted built-in ``hash``)."""
    digest = hashlib.blake2b(f"{salt}\0{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def split_hash(doc_id: str) -> int:
    """The hash that decides the train/val split (salted apart from the reading order)."""
    return stable_hash(doc_id, salt="val-split")


def is_validation_doc(doc_id: str, val_fraction: float) -> bool:
    """Whether ``doc_id`` is held out; a stable hash, independent of the reading order."""
    return split_hash(doc_id) < val_fraction * 2.0 ** 64


def source_key(cfg: DataConfig) -> str:
    """What identifies the source in the cache key: its resolved path, or stdlib + version."""
    if cfg.source == "stdlib":
        return f"stdlib:{sys.implementation.name}-{'.'.join(map(str, sys.version_info[:3]))}"
    return str(Path(cfg.source).expanduser().resolve())


def check_source(cfg: DataConfig) -> None:
    """Cheap checks (no full read) that ``cfg.source`` can give documents; ConfigError if not."""
    if cfg.source == "stdlib":
        _require_exists(Path(sysconfig.get_paths()["stdlib"]), "the standard library folder")
        return
    path = Path(cfg.source).expanduser()
    _require_exists(path, "data.source")
    if path.is_dir():
        if next(_folder_files(path, _suffixes(cfg)), None) is None:
            raise ConfigError(f"data.source ({cfg.source!r}) has no files ending in "
                              f"{cfg.file_suffixes!r}: add text files or set data.file_suffixes")
    elif path.suffix == ".jsonl":
        _check_first_jsonl_line(path)
    else:
        raise ConfigError(f"data.source ({cfg.source!r}) is a file but not a .jsonl: {_SOURCE_HELP}")


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Yield ``(doc_id, text)`` in stable-hash order until ``cfg.max_bytes`` (0 = all).

    ``max_bytes`` counts UTF-8 bytes of yielded text; the document that crosses the limit is
    still yielded whole. Empty (whitespace-only) documents are skipped.
    """
    check_source(cfg)
    emitted = 0
    for doc_id, read in _document_readers(cfg):
        text = read()
        if not text.strip():
            continue
        yield doc_id, text
        emitted += len(text.encode("utf-8"))
        if 0 < cfg.max_bytes <= emitted:
            return


def _document_readers(cfg: DataConfig) -> list[tuple[str, Callable[[], str]]]:
    """All documents as ``(doc_id, reader)``, sorted by stable hash; nothing is read yet."""
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        refs = _file_readers(root, {".py"})
    else:
        path = Path(cfg.source).expanduser()
        refs = _file_readers(path, _suffixes(cfg)) if path.is_dir() else _jsonl_readers(path)
    refs.sort(key=lambda ref: (stable_hash(ref[0], salt="order"), ref[0]))
    return refs


def _file_readers(root: Path, suffixes: set[str]) -> list[tuple[str, Callable[[], str]]]:
    """One reader per matching file; doc_id is the path relative to ``root`` (POSIX form)."""
    return [(file.relative_to(root).as_posix(), _file_reader(file))
            for file in _folder_files(root, suffixes)]


def _file_reader(file: Path) -> Callable[[], str]:
    return lambda: file.read_bytes().decode("utf-8", errors="replace")


def _folder_files(root: Path, suffixes: set[str]) -> Iterator[Path]:
    """Files under ``root`` with a wanted suffix; hidden and site-packages folders are pruned."""
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in _SKIP_DIRS]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in suffixes:
                yield Path(folder, name)


def _jsonl_readers(path: Path) -> list[tuple[str, Callable[[], str]]]:
    """One reader per non-blank line; doc_id is the 1-based line number."""
    refs = []
    offset = 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                refs.append((str(lineno), _jsonl_reader(path, offset, lineno)))
            offset += len(line)
    return refs


def _jsonl_reader(path: Path, offset: int, lineno: int) -> Callable[[], str]:
    def read() -> str:
        with path.open("rb") as f:
            f.seek(offset)
            return _jsonl_text(f.readline(), path, lineno)
    return read


def _jsonl_text(line: bytes, path: Path, lineno: int) -> str:
    """The ``text`` field of one JSONL line; ConfigError naming the line if it is not there."""
    fix = "each line must be a JSON object like {\"text\": \"...\"}"
    try:
        record = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"data.source ({str(path)!r}) line {lineno} is not JSON ({exc.msg}): "
                          f"{fix}") from exc
    if not isinstance(record, dict) or "text" not in record:
        raise ConfigError(f"data.source ({str(path)!r}) line {lineno} has no 'text' field: {fix}")
    if not isinstance(record["text"], str):
        raise ConfigError(f"data.source ({str(path)!r}) line {lineno}: 'text' is "
                          f"{type(record['text']).__name__}, not a string: {fix}")
    return record["text"]


def _check_first_jsonl_line(path: Path) -> None:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                _jsonl_text(line, path, lineno)
                return
    raise ConfigError(f"data.source ({str(path)!r}) has no non-blank lines: {_SOURCE_HELP}")


def _suffixes(cfg: DataConfig) -> set[str]:
    """``'.py, txt'`` -> ``{'.py', '.txt'}``."""
    items = [s.strip().lower() for s in cfg.file_suffixes.split(",") if s.strip()]
    return {s if s.startswith(".") else "." + s for s in items}


def _require_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise ConfigError(f"{what} ('{path}') does not exist: {_SOURCE_HELP}")
