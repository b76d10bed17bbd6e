"""Which text makes a corpus, and which split each document belongs to.

A document is one file. Its key is its path relative to the corpus root, with '/'
separators, and the key alone decides its split, so adding a file never moves another
one between train and validation. This module must never depend on the tokenizer or on
what was prepared before: the same files give the same documents on every machine.
"""

import hashlib
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "holdout")
# The standard library's own tests and IDLE are left out: they are not the code people write.
EMBEDDED_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "__pycache__"})
EMBEDDED_SUFFIXES = frozenset({".py", ".txt", ".rst"})
# Files found inside a directory given to `prepare text`; a file named directly is always read.
TEXT_SUFFIXES = frozenset(
    {".txt", ".md", ".rst", ".tex", ".py", ".c", ".h", ".cpp", ".rs", ".go", ".js", ".ts"}
)


class CorpusError(ValueError):
    """A corpus path that does not exist, holds no text, or gives an empty split."""


@dataclass(frozen=True)
class Document:
    key: str  # path relative to the corpus root, '/'-separated: decides the split
    text: str


def split_of(key: str) -> str:
    """The fixed split rule: sha256 bucket of the key; 5% val, 5% holdout, 90% train."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < 5:
        return "val"
    if bucket < 10:
        return "holdout"
    return "train"


def corpus_sha256(documents: list[Document]) -> str:
    """sha256 hex over every key and text, in order: changes whenever the corpus does."""
    digest = hashlib.sha256()
    for doc in documents:
        for part in (doc.key, doc.text):
            data = part.encode("utf-8")
            # Length prefixes keep ("ab", "c") and ("a", "bc") apart.
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def _walk(root: Path, prefix: str, skip_dir: Callable[[str], bool], suffixes: frozenset[str]):
    """Documents under `root`, sorted by key; files that are not UTF-8 are skipped with a note."""
    documents = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(skip_dir(part) for part in rel.parts[:-1]) or rel.name.startswith("."):
            continue
        if path.suffix not in suffixes or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            print(f"skipping {path}: not UTF-8 ({e.reason} at byte {e.start})", file=sys.stderr)
            continue
        if text:
            documents.append(Document(key=prefix + rel.as_posix(), text=text))
    return sorted(documents, key=lambda doc: doc.key)


def embedded_root() -> Path:
    """The running Python's standard library, the source of the offline default corpus."""
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_documents() -> list[Document]:
    """Every *.py, *.txt and *.rst of the standard library outside its tests and IDLE."""
    root = embedded_root()
    documents = _walk(root, "", lambda part: part in EMBEDDED_SKIP_DIRS, EMBEDDED_SUFFIXES)
    if not documents:
        raise CorpusError(f"no standard library sources found under {root}; use `prepare text`")
    return documents


def text_documents(paths: list[Path]) -> list[Document]:
    """The documents of `prepare text PATH...`.

    A file is read whatever its suffix (it must be UTF-8); a directory contributes, at any
    depth, its files with a suffix in TEXT_SUFFIXES, skipping hidden files and directories
    and __pycache__. Keys start with the argument's own name (`notes/a.md` for `notes/`), so
    they do not depend on where the corpus sits on disk.
    """
    documents: list[Document] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = _walk(
                path,
                f"{path.resolve().name}/",
                lambda part: part.startswith(".") or part == "__pycache__",
                TEXT_SUFFIXES,
            )
            if not found:
                raise CorpusError(
                    f"{path}: no non-empty UTF-8 file with a suffix in "
                    f"{' '.join(sorted(TEXT_SUFFIXES))}; name the files directly to use others"
                )
            documents.extend(found)
        elif path.is_file():
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it, "
                    f"e.g. `iconv -f latin1 -t utf-8 {path}`"
                ) from None
            if not text:
                raise CorpusError(f"{path}: the file is empty; leave it out")
            documents.append(Document(key=path.name, text=text))
        else:
            raise CorpusError(f"{path}: no such file or directory")
    if not documents:
        raise CorpusError("no path given: name at least one file or directory of text")
    return documents


def split_documents(documents: list[Document]) -> dict[str, list[Document]]:
    """Documents per split by `split_of`; CorpusError if any split is left empty."""
    splits: dict[str, list[Document]] = {split: [] for split in SPLITS}
    for doc in documents:
        splits[split_of(doc.key)].append(doc)
    empty = [split for split in SPLITS if not splits[split]]
    if empty:
        raise CorpusError(
            f"the corpus has {len(documents)} documents (one per file) and none falls in the "
            f"{' and '.join(empty)} split (5% each, by a hash of the file path); give more "
            "files, e.g. cut a large text into pieces with `split -l 2000 BIG.txt part_`"
        )
    return splits
