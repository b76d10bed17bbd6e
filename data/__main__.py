"""Command line: `python -m data prepare {embedded,text,fineweb} ...`.

This module only parses arguments and reports errors; the work is in data.prepare and
data.fineweb. It must never print a traceback for a mistake the user can fix.
"""

import argparse
import sys
import time
from pathlib import Path

from data.cache import ENV_VAR, DataMissingError, cache_dir, dataset_dir
from data.corpus import TEXT_SUFFIXES, CorpusError
from data.fineweb import MAX_TRAIN_SHARDS, REPO_ID, prepare_fineweb
from data.prepare import prepare_embedded, prepare_text
from data.shards import ShardError
from data.tokenizer import TokenizerError


def _dataset_name(value: str) -> str:
    try:
        dataset_dir(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _train_shards(value: str) -> int:
    shards = int(value)
    if not 1 <= shards <= MAX_TRAIN_SHARDS:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_TRAIN_SHARDS}], got {shards}")
    return shards


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data",
        description=f"Prepare datasets in {cache_dir()} (set ${ENV_VAR} to move it).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="build a dataset: shards, tokenizer, meta.json")
    sources = prepare.add_subparsers(dest="source", required=True)

    def add_common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--force", action="store_true", help="rebuild even if the dataset is complete"
        )

    embedded = sources.add_parser(
        "embedded", help="offline default: the running Python's standard library sources"
    )
    text = sources.add_parser(
        "text",
        help="your own text files",
        description="Directories are read recursively for files ending in "
        f"{' '.join(sorted(TEXT_SUFFIXES))} (hidden ones skipped); files named directly are "
        "read whatever their suffix. Each file is one document and must be UTF-8.",
    )
    text.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or directories")
    for sub, default in ((embedded, "embedded"), (text, "text")):
        sub.add_argument(
            "--name", type=_dataset_name, default=default, help=f"dataset name (default: {default})"
        )
        sub.add_argument(
            "--vocab-size",
            type=int,
            default=4096,
            help="tokenizer vocabulary, special tokens included (default: 4096)",
        )
        add_common(sub)
    fineweb = sources.add_parser(
        "fineweb", help=f"GPT-2 tokenized FineWeb shards from {REPO_ID} (needs the network)"
    )
    fineweb.add_argument(
        "--shards",
        type=_train_shards,
        required=True,
        help="number of 100M-token train shards to download (the 124M speedrun reads ~8)",
    )
    add_common(fineweb)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        if args.source == "embedded":
            prepare_embedded(args.vocab_size, args.name, args.force)
        elif args.source == "text":
            prepare_text(args.paths, args.name, args.vocab_size, args.force)
        else:
            prepare_fineweb(args.shards, args.force)
    except (CorpusError, TokenizerError, ShardError, DataMissingError) as e:
        sys.exit(f"error: {e}")
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
