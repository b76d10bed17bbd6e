"""FineWeb tokenized with GPT-2, as published for the NanoGPT speedrun, as a dataset.

`python -m data prepare fineweb --shards N` downloads `fineweb_val_000000.bin` and
`fineweb_train_000001.bin` .. `fineweb_train_00000N.bin` (100M tokens each) from the Hugging
Face dataset repo kjj0/fineweb10B-gpt2 into dataset_dir("fineweb"), then
`finalize_fineweb` checks every shard and writes meta.json. The train shards are used as
downloaded. The published val shard is cut at the first document boundary after its middle:
the first half becomes `val_000.bin` ("val", what the speedrun evaluates on, a prefix of the
same stream) and the second half `holdout_000.bin` ("holdout"); the download is kept so a
rebuild need not fetch it again. This module must never touch the network outside
`prepare_fineweb`, so tests run `finalize_fineweb` on shards they write themselves.
"""

import hashlib
from pathlib import Path

import numpy as np

from data.cache import META_FILE, DataMissingError, dataset_dir
from data.corpus import SPLITS
from data.prepare import PIPELINE, created_with, current_meta, fingerprint, shard_name, write_meta
from data.shards import HEADER_BYTES, read_shard, write_shard

REPO_ID = "kjj0/fineweb10B-gpt2"
NAME = "fineweb"
MAX_TRAIN_SHARDS = 103  # the repo holds fineweb_train_000001.bin .. fineweb_train_000103.bin
VAL_FILE = "fineweb_val_000000.bin"
VOCAB_SIZE = 50257  # GPT-2
EOT_TOKEN = 50256  # GPT-2's <|endoftext|>, written before every document


def train_file(index: int) -> str:
    return f"fineweb_train_{index:06d}.bin"


def _request(train_shards: int) -> dict:
    return {"pipeline": PIPELINE, "kind": "fineweb", "train_shards": train_shards}


def prepare_fineweb(shards: int, force: bool = False) -> dict:
    """Download the val shard and `shards` train shards, then finalize the dataset."""
    if not 1 <= shards <= MAX_TRAIN_SHARDS:
        raise ValueError(
            f"--shards {shards}: {REPO_ID} has train shards 1 to {MAX_TRAIN_SHARDS} "
            "(100M tokens each); the GPT-2 124M speedrun reads about 8"
        )
    directory = dataset_dir(NAME)
    if not force and (meta := current_meta(directory, _request(shards))) is not None:
        print(f"{NAME}: already prepared in {directory}, nothing to do (--force rebuilds)")
        return meta
    # Imported here: the hub client is slow to import and only this path needs it.
    from huggingface_hub import hf_hub_download

    directory.mkdir(parents=True, exist_ok=True)
    train_files = [train_file(i) for i in range(1, shards + 1)]
    for filename in [VAL_FILE, *train_files]:
        try:
            # Resumes partial downloads, skips finished ones unless forced; shows progress.
            hf_hub_download(
                repo_id=REPO_ID,
                filename=filename,
                repo_type="dataset",
                local_dir=directory,
                force_download=force,
            )
        except OSError as e:
            raise DataMissingError(
                f"could not download {filename} from the Hugging Face dataset {REPO_ID} into "
                f"{directory}: {e}. Check the network (and HF_HUB_OFFLINE), then re-run "
                f"`python -m data prepare fineweb --shards {shards}`: finished files are kept"
            ) from e
    return finalize_fineweb(directory, train_files, VAL_FILE)


def finalize_fineweb(directory: Path, train_files: list[str], val_file: str) -> dict:
    """Check the downloaded shards, cut val into val + holdout, write meta.json last.

    The fingerprint reads each shard's name, size and header, not its content: files on the
    hub never change under a name, and hashing gigabytes would make every check slow.
    """
    # Downloads only add files; from here on listed files change, so the old meta must go.
    (directory / META_FILE).unlink(missing_ok=True)
    val = read_shard(directory / val_file)
    # Cut where a document starts, so neither half begins mid-document.
    middle = len(val) // 2
    starts = np.flatnonzero(val[middle:] == EOT_TOKEN)
    cut = middle + int(starts[0]) if starts.size else middle
    write_shard(directory / shard_name("val", 0), val[:cut])
    write_shard(directory / shard_name("holdout", 0), val[cut:])
    files = {
        "train": train_files,
        "val": [shard_name("val", 0)],
        "holdout": [shard_name("holdout", 0)],
    }

    digest = hashlib.sha256()
    tokens, documents = {}, {}
    for split in SPLITS:
        tokens[split] = documents[split] = 0
        for name in files[split]:
            path = directory / name
            shard = read_shard(path)
            tokens[split] += len(shard)
            documents[split] += int(np.count_nonzero(shard == EOT_TOKEN))
            with open(path, "rb") as f:
                header = f.read(HEADER_BYTES)
            digest.update(f"{name}\n{path.stat().st_size}\n".encode() + header)
    meta = {
        "name": directory.name,
        "kind": "fineweb",
        "vocab_size": VOCAB_SIZE,
        "eot_token": EOT_TOKEN,
        "tokenizer": "gpt2",
        "token_bytes": None,  # GPT-2's byte table needs tiktoken's download
        "splits": files,
        "tokens": tokens,
        "documents": documents,
        "bytes": None,
        "fingerprint": fingerprint("gpt2", digest.hexdigest()),
        "request": _request(len(train_files)),
        "source": f"https://huggingface.co/datasets/{REPO_ID}",
        "created_with": created_with("numpy", "huggingface_hub"),
    }
    write_meta(directory, meta)
    print(f"{NAME}: prepared in {directory}, fingerprint {meta['fingerprint'][:12]}")
    for split in SPLITS:
        print(f"  {split:8s} {documents[split]:9,d} documents {tokens[split]:13,d} tokens")
    return meta
