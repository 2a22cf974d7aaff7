"""Transfer sets: text / JSONL / CSV files, or the built-in English set; a deterministic train/validation split."""
from __future__ import annotations

import ast
import csv
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedistill.errors import DataError

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
BUILTIN_NAME = "builtin:english"  # WordNet glosses (else Python's docstrings): short, alike definitions
BUILTIN_VARIED = "builtin:varied"  # glosses, fortunes and docstring paragraphs in turn: varied in source and length


@dataclass
class TransferSet:
    """Texts (and optional integer labels) the student learns from; `sha256` identifies the content."""

    source: str
    texts: list[str]
    labels: list[int] | None
    sha256: str

    def __len__(self) -> int:
        return len(self.texts)


def _content_sha256(texts: list[str], labels: list[int] | None) -> str:
    h = hashlib.sha256()
    for i, t in enumerate(texts):
        h.update(t.encode("utf-8"))
        h.update(b"\x00" if labels is None else f"\x01{labels[i]}".encode())
        h.update(b"\n")
    return h.hexdigest()


def _decode_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}", hint="pass --data PATH to a readable file") from None
    bom = len(b"\xef\xbb\xbf") if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + bom
        line = raw[:offset].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 (line {line}, byte {offset})", hint="re-encode the file as UTF-8") from None
    return text.splitlines()


def _labels_to_ids(raw: list, label_names: list[str] | None, source: str) -> list[int]:
    """Map labels (ints or the teacher's label names) to class ids."""
    ids = []
    index = {name: i for i, name in enumerate(label_names or [])}
    for n, value in enumerate(raw, 1):
        if isinstance(value, str) and value in index:
            ids.append(index[value])
        elif isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
            ids.append(int(value))
        else:
            known = f"; the teacher's labels are {label_names}" if label_names else ""
            raise DataError(f"{source}: record {n} has label {value!r}, not a class id{known}", hint="use class ids or the teacher's label names")
        if label_names is not None and not 0 <= ids[-1] < len(label_names):
            raise DataError(f"{source}: record {n} has label {value!r}; the teacher has {len(label_names)} classes")
    return ids


def load_transfer_set(
    path: str | Path | None,
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
    max_texts: int | None = None,
    builtin: str = BUILTIN_NAME,
) -> TransferSet:
    """Return the transfer set in a .txt / .jsonl / .csv file, or a built-in set (`builtin` when `path` is None;
    `path` may also name one, e.g. 'builtin:varied')."""
    if path is None or str(path) in BUILTIN_SETS:
        source = builtin if path is None else str(path)
        texts = builtin_texts(source, max_texts)
        labels_raw = None
    else:
        path = Path(path)
        if path.is_dir():
            raise DataError(f"data path {path} is a directory", hint="pass --data PATH to a .txt, .jsonl or .csv file")
        if not path.is_file():
            raise DataError(f"data file {path} does not exist", hint="pass --data PATH to a .txt, .jsonl or .csv file, "
                            f"or a built-in set ({', '.join(BUILTIN_SETS)})")
        source = str(path)
        lines = _decode_lines(path)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            texts, labels_raw = _read_jsonl(lines, path, text_column, label_column)
        elif suffix == ".csv":
            texts, labels_raw = _read_csv(lines, path, text_column, label_column)
        else:
            texts, labels_raw = [ln.strip() for ln in lines if ln.strip()], None
    if max_texts is not None:
        texts = texts[:max_texts]
        labels_raw = labels_raw[:max_texts] if labels_raw else labels_raw
    if len(texts) < 2:
        raise DataError(f"{source} holds {len(texts)} text(s); distillation needs at least 2", hint="pass a larger --data file")
    labels = _labels_to_ids(labels_raw, label_names, source) if labels_raw else None
    return TransferSet(source=source, texts=texts, labels=labels, sha256=_content_sha256(texts, labels))


def _read_jsonl(lines: list[str], path: Path, text_column: str, label_column: str) -> tuple[list[str], list | None]:
    texts, labels = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON: {e.msg}", hint="one JSON object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n} is not a JSON object", hint="one JSON object per line, like {\"text\": ...}")
        if not isinstance(record.get(text_column), str):
            raise DataError(f"{path}:{n} has no string field '{text_column}'", hint="each line needs {\"text\": ...} or pass --text-column")
        texts.append(record[text_column])
        labels.append(record.get(label_column))
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        raise DataError(f"{path}: '{label_column}' is on some records only", hint="label every record or none")
    return texts, labels if texts and all(has) else None


def _read_csv(lines: list[str], path: Path, text_column: str, label_column: str) -> tuple[list[str], list | None]:
    reader = csv.DictReader(lines)
    if not reader.fieldnames:
        raise DataError(f"{path} is empty: a CSV needs a header row with a '{text_column}' column", hint="pass a non-empty --data file")
    if text_column not in reader.fieldnames:
        raise DataError(
            f"{path} has no column '{text_column}' (columns: {reader.fieldnames})", hint="pass --text-column NAME"
        )
    rows = [r for r in reader if (r.get(text_column) or "").strip()]
    texts = [r[text_column].strip() for r in rows]
    labels = [r[label_column] for r in rows] if label_column in reader.fieldnames else None
    return texts, labels


def builtin_english_texts(limit: int = 24000) -> list[str]:
    """Return up to `limit` English sentences from text on this machine: WordNet glosses, else Python's docstrings.

    The order is a fixed interleaving of the sources, so the set is the same on every machine with the same files.
    """
    texts = _wordnet_glosses() if WORDNET_DIR.is_dir() else []
    if len(texts) < limit:
        texts += _stdlib_docstring_sentences()
    if not texts:
        raise DataError("no built-in English text found on this machine", hint="install Debian's wordnet-base or pass --data")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))[:limit]
    return [texts[i] for i in order]


def builtin_varied_texts(limit: int = 24000) -> list[str]:
    """Return up to `limit` English texts of three registers and lengths, taken in turn (each source in a fixed
    shuffled order, so a longer set starts with a shorter one): WordNet glosses (definitions, median ~50 characters),
    Debian's fortunes (quotations, jokes, verse, dialogue; median ~100) and paragraphs of the standard library's
    docstrings (technical prose, 100-1,200 characters). A source that is missing here is left out."""
    sources = [s for s in (_wordnet_glosses() if WORDNET_DIR.is_dir() else [], _fortunes(), _stdlib_docstring_paragraphs()) if s]
    if not sources:
        raise DataError("no built-in English text found on this machine",
                        hint="install Debian's wordnet-base and fortunes (make install) or pass --data")
    shuffled = [[s[i] for i in np.random.default_rng(n).permutation(len(s))] for n, s in enumerate(sources)]
    out, seen = [], set()
    for row in range(max(len(s) for s in shuffled)):
        for s in shuffled:
            if row < len(s) and s[row] not in seen:
                seen.add(s[row])
                out.append(s[row])
                if len(out) == limit:
                    return out
    return out


BUILTIN_SETS = {BUILTIN_NAME: "builtin_english_texts", BUILTIN_VARIED: "builtin_varied_texts"}


def builtin_texts(name: str, limit: int | None = None) -> list[str]:
    """Return the first `limit` texts (default: the set's own size) of the built-in set `name`; a longer set starts
    with a shorter one."""
    make = globals()[BUILTIN_SETS[name]]
    return make() if limit is None else make(limit=limit)


def _fortunes() -> list[str]:
    """Debian's fortunes (package fortunes / fortunes-min): every file's '%'-separated items, whitespace joined;
    ASCII art and items under 20 characters or mostly non-letters are left out."""
    out = []
    for f in sorted(FORTUNES_DIR.glob("*")) if FORTUNES_DIR.is_dir() else ():
        if f.suffix in (".dat", ".u8") or f.is_symlink() or not f.is_file() or f.name == "ascii-art":
            continue
        for item in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(item.split())
            if 20 <= len(text) <= 1500 and sum(c.isalpha() for c in text) > 0.6 * len(text):
                out.append(text)
    return out


def _stdlib_docstrings() -> list[str]:
    """Every module, class and function docstring of the standard library's top-level modules, in file order."""
    stdlib = Path(sys.modules["os"].__file__).parent
    out = []
    for f in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return out


def _stdlib_docstring_paragraphs() -> list[str]:
    """Paragraphs of prose (100-1,200 characters, no doctest or indented code) of the standard library's docstrings."""
    out = []
    for doc in _stdlib_docstrings():
        for block in doc.split("\n\n"):
            if ">>>" in block or block.startswith((" ", "\t")):
                continue
            text = " ".join(block.split())
            if 100 <= len(text) <= 1200:
                out.append(text)
    return out


def _wordnet_glosses() -> list[str]:
    out, seen = [], set()
    for pos in ("noun", "verb", "adj", "adv"):
        f = WORDNET_DIR / f"data.{pos}"
        if not f.is_file():
            continue
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue  # license header
            gloss = line.split(" | ", 1)[1].strip()
            if gloss and gloss not in seen:
                seen.add(gloss)
                out.append(gloss)
    return out


def _stdlib_docstring_sentences() -> list[str]:
    out = []
    for doc in _stdlib_docstrings():
        para = " ".join(doc.split("\n\n")[0].split())
        if 20 <= len(para) <= 400:
            out.append(para)
    return out


OUT_OF_DOMAIN_NAME = "Python's reference documentation (pydoc_data.topics), paragraphs of 300-1,500 characters"


def out_of_domain_texts(limit: int = 256) -> list[str]:
    """Return up to `limit` long paragraphs of technical prose shipped with every Python (the language reference
    behind `help()`): another source, register and length than the built-in glosses (median 405 characters vs ~50),
    never trained on, so fidelity on them says how the student does beyond its transfer set. Fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            text = " ".join(block.split())
            # prose only: no code (>>>), tables (| +) or bullet fragments, at least ~40 words
            if 300 <= len(text) <= 1500 and not text.startswith((">>>", "*", "|", "+")) and text.count(" ") > 40:
                paragraphs.append(text)
    order = np.random.default_rng(0).permutation(len(paragraphs))[:limit]
    return [paragraphs[i] for i in sorted(order)]


def split_indices(n: int, val_fraction: float, seed: int, max_val: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, validation) index arrays: a seeded permutation, the validation part at least one item."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}", hint="e.g. --val-fraction 0.05")
    n_val = min(max(1, round(n * val_fraction)), max_val, n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
