"""Build a dataset in the cache: documents -> tokenizer -> shards -> meta.json.

Every file is written atomically and meta.json last, after removing the old one first, so
a killed prepare never leaves a dataset that looks complete. Re-running with the same
request finds the dataset complete and does nothing. This module must never change a
dataset in place without `--force` or a changed request, and never touches the network
(FineWeb downloads live in `data.fineweb`).
"""

import hashlib
import json
import platform
import re
from importlib.metadata import version
from pathlib import Path

import numpy as np

from data.cache import META_FILE, atomic_write, dataset_dir
from data.corpus import (
    SPLITS,
    Document,
    corpus_sha256,
    embedded_documents,
    embedded_root,
    split_documents,
    text_documents,
)
from data.shards import ShardError, read_header, write_shard
from data.tokenizer import (
    EOT,
    FILE_NAME,
    save_tokenizer,
    token_byte_lengths,
    tokenizer_fingerprint,
    train_tokenizer,
)

# Bump when the way documents become shards changes: datasets of different pipelines
# then get different fingerprints and are rebuilt instead of reused.
PIPELINE = "speedloop-data/1"
SHARD_TOKENS = 100_000_000  # 200 MB per shard, as the public FineWeb shards
TOKEN_BYTES_FILE = "token_bytes.npy"
_OWN_SHARD = re.compile(r"(train|val|holdout)_\d{3}\.bin")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:03d}.bin"


def current_meta(directory: Path, request: dict) -> dict | None:
    """The dataset's meta if it was built for `request` and every file it lists is intact."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if meta.get("request") != request:
        return None
    # FineWeb has neither file: its tokenizer is tiktoken's "gpt2", its token_bytes is null.
    side_files = [meta.get("tokenizer"), meta.get("token_bytes")]
    if not all((directory / name).is_file() for name in side_files if name not in (None, "gpt2")):
        return None
    try:
        counts = {
            split: sum(read_header(directory / f) for f in meta["splits"][split])
            for split in SPLITS
        }
    except (KeyError, FileNotFoundError, ShardError):
        return None
    return meta if counts == meta.get("tokens") else None


def write_meta(directory: Path, meta: dict) -> None:
    """Write meta.json (the mark of a complete dataset), then drop shards it no longer lists."""
    with atomic_write(directory / META_FILE) as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    listed = {name for files in meta["splits"].values() for name in files}
    for path in directory.iterdir():
        if _OWN_SHARD.fullmatch(path.name) and path.name not in listed:
            path.unlink()


def write_split(directory: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> list[str]:
    """Write one split as shards of at most `shard_tokens` tokens; returns the file names."""
    names = []
    for index, start in enumerate(range(0, len(tokens), shard_tokens)):
        names.append(shard_name(split, index))
        write_shard(directory / names[-1], tokens[start : start + shard_tokens])
    return names


def build_dataset(
    name: str,
    kind: str,
    documents: list[Document],
    source: str | list[str],
    vocab_size: int,
    force: bool = False,
    shard_tokens: int = SHARD_TOKENS,
) -> dict:
    """Train a tokenizer on the train documents, write every split, return the meta."""
    directory = dataset_dir(name)
    corpus = corpus_sha256(documents)
    request = {
        "pipeline": PIPELINE,
        "kind": kind,
        "vocab_size": vocab_size,
        "corpus_sha256": corpus,
    }
    if not force and (meta := current_meta(directory, request)) is not None:
        print(f"{name}: already prepared in {directory}, nothing to do (--force rebuilds)")
        return meta
    print(f"{name}: building in {directory} from {len(documents)} documents")
    splits = split_documents(documents)
    enc = train_tokenizer((doc.text for doc in splits["train"]), vocab_size)
    eot = enc.encode_single_token(EOT)

    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    save_tokenizer(enc, directory)
    with atomic_write(directory / TOKEN_BYTES_FILE) as f:
        np.save(f, token_byte_lengths(enc))
    files, tokens, n_bytes = {}, {}, {}
    for split, docs in splits.items():
        encoded = enc.encode_ordinary_batch([doc.text for doc in docs])
        # <|endoftext|> before every document: each one starts like a fresh sequence.
        stream = np.concatenate([np.array([eot] + ids, dtype=np.uint16) for ids in encoded])
        files[split] = write_split(directory, split, stream, shard_tokens)
        tokens[split] = len(stream)
        n_bytes[split] = sum(len(doc.text.encode("utf-8")) for doc in docs)

    meta = {
        "name": name,
        "kind": kind,
        "vocab_size": enc.n_vocab,
        "eot_token": eot,
        "tokenizer": FILE_NAME,
        "token_bytes": TOKEN_BYTES_FILE,
        "splits": files,
        "tokens": tokens,
        "documents": {split: len(docs) for split, docs in splits.items()},
        "bytes": n_bytes,
        "fingerprint": fingerprint(corpus, tokenizer_fingerprint(enc)),
        "request": request,
        "source": source,
        "created_with": created_with("numpy", "tiktoken", "rustbpe"),
    }
    write_meta(directory, meta)
    print(f"{name}: prepared, fingerprint {meta['fingerprint'][:12]}")
    for split in SPLITS:
        print(
            f"  {split:8s} {meta['documents'][split]:6d} documents {tokens[split]:11,d} tokens "
            f"{n_bytes[split] / tokens[split]:.2f} bytes/token"
        )
    return meta


def created_with(*packages: str) -> dict[str, str]:
    """The Python version and the versions of `packages` that built a dataset."""
    return {"python": platform.python_version(), **{pkg: version(pkg) for pkg in packages}}


def fingerprint(*parts: str) -> str:
    """sha256 hex of the pipeline version and `parts` (corpus and tokenizer digests)."""
    return hashlib.sha256("\n".join((PIPELINE, *parts)).encode("utf-8")).hexdigest()


def prepare_embedded(vocab_size: int = 4096, name: str = "embedded", force: bool = False) -> dict:
    """The offline default corpus: the running Python's standard library."""
    return build_dataset(
        name, "embedded", embedded_documents(), str(embedded_root()), vocab_size, force
    )


def prepare_text(
    paths: list[Path], name: str = "text", vocab_size: int = 4096, force: bool = False
) -> dict:
    """A corpus of the user's own files and directories (see corpus.text_documents)."""
    source = [str(Path(p).resolve()) for p in paths]
    return build_dataset(name, "text", text_documents(paths), source, vocab_size, force)
