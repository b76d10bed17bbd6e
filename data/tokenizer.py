"""The BPE tokenizer of the embedded and text datasets: trained with rustbpe, used as tiktoken.

Training needs rustbpe; loading and encoding need only tiktoken, because GPU machines
have no rustbpe. A saved tokenizer is one JSON file (base64 token bytes in rank order,
the split pattern, the special tokens): never a pickle, so loading runs no code.
This module must never import rustbpe outside `train_tokenizer`.
"""

import base64
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tiktoken

from data.cache import atomic_write

FILE_NAME = "tokenizer.json"
FORMAT = "speedloop-tokenizer/1"
EOT = "<|endoftext|>"  # the document separator; also the BOS token of every sequence
# Their ids come right after the learned tokens, in this order.
SPECIAL_TOKENS = (EOT, "<|pad|>", "<|user|>", "<|assistant|>")
# Shards store uint16 tokens; rustbpe starts from the 256 byte tokens.
MAX_VOCAB = 65536
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


class TokenizerError(ValueError):
    """A vocabulary that cannot be trained, or a tokenizer file that cannot be loaded."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> tiktoken.Encoding:
    """Train a byte-level BPE of exactly `vocab_size` ids, the special tokens included."""
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise TokenizerError(
            f"vocab size {vocab_size} is out of range: it must be in [{MIN_VOCAB}, {MAX_VOCAB}] "
            f"(256 byte tokens and {len(SPECIAL_TOKENS)} special tokens at least; uint16 shards "
            "at most)"
        )
    import rustbpe  # only here: the GPU machines load tokenizers without it

    n_learned = vocab_size - len(SPECIAL_TOKENS)
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), n_learned)
    ranks = trainer.get_mergeable_ranks()
    if len(ranks) != n_learned:
        # rustbpe stops early when no pair is left to merge.
        raise TokenizerError(
            f"the training text is too small for vocab size {vocab_size}: it yields only "
            f"{len(ranks)} tokens; use --vocab-size {len(ranks) + len(SPECIAL_TOKENS)} or "
            "less, or give more text"
        )
    return _encoding(
        name=f"speedloop-bpe-{vocab_size}",
        pattern=trainer.get_pattern(),
        ranks=[bytes(token) for token, _ in sorted(ranks, key=lambda item: item[1])],
    )


def _encoding(name: str, pattern: str, ranks: list[bytes]) -> tiktoken.Encoding:
    special = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name=name,
        pat_str=pattern,
        mergeable_ranks={token: rank for rank, token in enumerate(ranks)},
        special_tokens=special,
        explicit_n_vocab=len(ranks) + len(special),
    )


def _describe(enc: tiktoken.Encoding) -> dict:
    """Everything that decides how `enc` tokenizes, as JSON-ready values.

    tiktoken has no public accessor for the pattern and the ranks; its version is pinned.
    """
    ranks = sorted(enc._mergeable_ranks.items(), key=lambda item: item[1])
    return {
        "pattern": enc._pat_str,
        "ranks": [base64.b64encode(token).decode("ascii") for token, _ in ranks],
        "special_tokens": dict(sorted(enc._special_tokens.items(), key=lambda item: item[1])),
    }


def tokenizer_fingerprint(enc: tiktoken.Encoding) -> str:
    """sha256 hex over the ranks, the pattern and the special tokens (not the name)."""
    canonical = json.dumps(_describe(enc), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def save_tokenizer(enc: tiktoken.Encoding, directory: Path) -> Path:
    path = Path(directory) / FILE_NAME
    content = {"format": FORMAT, "name": enc.name, **_describe(enc)}
    with atomic_write(path) as f:
        f.write(json.dumps(content, ensure_ascii=True).encode("ascii"))
    return path


def load_tokenizer(directory: Path) -> tiktoken.Encoding:
    path = Path(directory) / FILE_NAME
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(
            f"{path} does not exist; prepare the dataset first "
            "(`python -m data prepare embedded` or `python -m data prepare text PATH...`)"
        ) from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); rebuild with --force") from None
    if content.get("format") != FORMAT:
        raise TokenizerError(
            f"{path}: format {content.get('format')!r}, expected {FORMAT!r}; rebuild the "
            "dataset with `python -m data prepare ... --force`"
        )
    ranks = [base64.b64decode(token) for token in content["ranks"]]
    enc = _encoding(content["name"], content["pattern"], ranks)
    if content["special_tokens"] != {t: enc.encode_single_token(t) for t in SPECIAL_TOKENS}:
        raise TokenizerError(
            f"{path}: special tokens {content['special_tokens']} differ from this version's "
            f"{list(SPECIAL_TOKENS)} after {len(ranks)} learned tokens; rebuild the dataset "
            "with `python -m data prepare ... --force`"
        )
    return enc


def token_byte_lengths(enc: tiktoken.Encoding) -> np.ndarray:
    """int32 per id: the UTF-8 byte length of the token, 0 for special tokens (for bpb)."""
    special = {enc.encode_single_token(token) for token in enc.special_tokens_set}
    return np.array(
        [0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)],
        dtype=np.int32,
    )
