"""data/: shard format, cache locations, tokenizer and loader, on small data written here."""

import json
import random
import sys

import numpy as np
import pytest
import torch

from data.cache import DataMissingError, cache_dir, dataset_dir, load_meta
from data.fineweb import EOT_TOKEN, finalize_fineweb
from data.loader import Loader, open_split, read_split_tokens
from data.shards import HEADER_BYTES, ShardError, read_shard, write_shard
from data.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    load_tokenizer,
    save_tokenizer,
    token_byte_lengths,
    tokenizer_fingerprint,
    train_tokenizer,
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache, never the user's."""
    monkeypatch.setenv("SPEEDLOOP_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Pseudo-English paragraphs: varied enough to learn a few hundred merges."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "xe", "zu", "an", "el", "or"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(300)]
    return [
        " ".join(rng.choices(words, k=200)).capitalize() + f".\n{i}: déjà vu, 東京 🙂\n"
        for i in range(n)
    ]


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize(
    "tokens",
    [[0, 1, 65535, 7], np.arange(1000, dtype=np.int64), np.array([5, 6], dtype=np.uint16), []],
)
def test_shard_round_trip(tmp_path, tokens):
    path = tmp_path / "train_000.bin"
    write_shard(path, tokens)
    read = read_shard(path)
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, np.asarray(tokens, dtype=np.int64))
    assert path.stat().st_size == HEADER_BYTES + 2 * len(read)
    assert [p.name for p in tmp_path.iterdir()] == ["train_000.bin"]  # no temp file left


def test_read_shard_is_memory_mapped(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(100))
    assert isinstance(read_shard(tmp_path / "a.bin"), np.memmap)


@pytest.mark.parametrize("bad", [-1, 65536, 10**9])
def test_write_shard_refuses_tokens_out_of_range(tmp_path, bad):
    path = tmp_path / "x.bin"
    with pytest.raises(ShardError, match=rf"{path}.*token {bad} at index 2"):
        write_shard(path, [1, 2, bad, 3])
    assert not path.exists()


def _corrupt(path, header=None, size_delta=0):
    data = bytearray(path.read_bytes())
    if header is not None:
        index, value = header
        data[4 * index : 4 * index + 4] = np.int32(value).tobytes()
    data = data[: len(data) + size_delta] if size_delta < 0 else data + b"\0" * size_delta
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "header, size_delta, message",
    [
        ((0, 12345), 0, "magic number 12345, expected 20240520"),
        ((1, 2), 0, "shard version 2, only version 1"),
        (None, -2, "header says 1000 tokens but the file holds 999"),
        (None, 2, "header says 1000 tokens but the file holds 1001"),
        (None, -1, "header says 1000 tokens but the file holds 999.5"),
        ((2, 5), 0, "header says 5 tokens but the file holds 1000"),
        (None, -(HEADER_BYTES + 2000 - 100), "holds 100 bytes, less than the 1024-byte header"),
    ],
)
def test_corrupt_shards_are_refused_naming_the_file(cache, header, size_delta, message):
    path = dataset_dir("embedded") / "train_000.bin"
    path.parent.mkdir(parents=True)
    write_shard(path, np.arange(1000))
    _corrupt(path, header, size_delta)
    with pytest.raises(ShardError) as err:
        read_shard(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)
    assert "python -m data prepare embedded --force" in str(err.value)


# ---------------------------------------------------------------- cache


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    assert dataset_dir("fineweb") == tmp_path / "cache" / "fineweb"
    monkeypatch.delenv("SPEEDLOOP_DATA")
    assert str(cache_dir()).endswith(".cache/speedloop")


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", ""])
def test_dataset_names_must_be_plain(name):
    with pytest.raises(ValueError, match="plain directory name"):
        dataset_dir(name)


@pytest.mark.parametrize(
    "name, command",
    [
        ("embedded", "`python -m data prepare embedded`"),
        ("fineweb", "`python -m data prepare fineweb --shards N`"),
        ("text", "`python -m data prepare text PATH...`"),
        ("notes", "`python -m data prepare text PATH... --name notes`"),
    ],
)
def test_missing_dataset_names_the_prepare_command(cache, name, command):
    for call in (lambda: load_meta(name), lambda: open_split(name, "train", 0, "cpu")):
        with pytest.raises(DataMissingError) as err:
            call()
        assert command in str(err.value)
        assert str(cache / name) in str(err.value)
    assert issubclass(DataMissingError, FileNotFoundError)


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def enc():
    return train_tokenizer(synthetic_texts(40), vocab_size=400)


def test_tokenizer_vocab_and_special_tokens(enc):
    assert enc.n_vocab == 400
    ids = [enc.encode_single_token(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(400 - len(SPECIAL_TOKENS), 400))
    assert enc.eot_token == ids[0]
    assert enc.encode("<|endoftext|>x", allowed_special="all")[0] == ids[0]


def test_tokenizer_round_trip(enc):
    for text in [*synthetic_texts(3, seed=1), "never seen: ñ ü 中文 \t\n  spaces ", ""]:
        tokens = enc.encode_ordinary(text)
        assert enc.decode(tokens) == text
    assert len(enc.encode_ordinary(synthetic_texts(1)[0])) < len(synthetic_texts(1)[0]) / 2


def test_tokenizer_save_load(enc, tmp_path, monkeypatch):
    path = save_tokenizer(enc, tmp_path)
    assert json.loads(path.read_text())["format"] == "speedloop-tokenizer/1"
    monkeypatch.setitem(sys.modules, "rustbpe", None)  # loading must not need rustbpe
    loaded = load_tokenizer(tmp_path)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(enc)
    assert loaded.n_vocab == enc.n_vocab and loaded.special_tokens_set == enc.special_tokens_set
    text = synthetic_texts(1, seed=2)[0]
    assert loaded.encode_ordinary(text) == enc.encode_ordinary(text)


def test_load_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"format": "pickle"}')
    with pytest.raises(TokenizerError, match="format 'pickle'"):
        load_tokenizer(tmp_path)


def test_token_byte_lengths(enc):
    lengths = token_byte_lengths(enc)
    assert lengths.dtype == np.int32 and lengths.shape == (enc.n_vocab,)
    assert (lengths[-len(SPECIAL_TOKENS) :] == 0).all() and (lengths[:256] == 1).all()
    for text in [*synthetic_texts(2, seed=3), "ünïcödé 🙂"]:
        assert lengths[enc.encode_ordinary(text)].sum() == len(text.encode("utf-8"))


def test_tokenizer_refuses_impossible_vocab_sizes():
    with pytest.raises(TokenizerError, match="vocab size 100 is out of range"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(TokenizerError, match="vocab size 70000 is out of range"):
        train_tokenizer(["abc"], vocab_size=70000)
    with pytest.raises(TokenizerError, match="too small for vocab size 4096"):
        train_tokenizer(["hello world"] * 3, vocab_size=4096)


# ---------------------------------------------------------------- loader


@pytest.fixture
def counting_shards(tmp_path):
    """Two shards whose concatenation is 0, 1, ..., 2499: every window is a run of integers."""
    files = [tmp_path / "train_000.bin", tmp_path / "train_001.bin"]
    write_shard(files[0], np.arange(0, 1000))
    write_shard(files[1], np.arange(1000, 2500))
    return files


@pytest.mark.parametrize("batch_size, seq_len", [(1, 1), (3, 7), (4, 1023), (2, 2499), (64, 16)])
def test_loader_windows(counting_shards, device, batch_size, seq_len):
    loader = Loader(counting_shards, seed=0, device=device)
    assert loader.num_tokens == 2500
    for _ in range(3):
        x, y = loader.next_batch(batch_size, seq_len)
        assert x.shape == y.shape == (batch_size, seq_len)
        assert x.dtype == y.dtype == torch.int64 and x.device.type == device.type
        assert x.is_contiguous() and y.is_contiguous()
        x, y = x.cpu(), y.cpu()
        torch.testing.assert_close(x + torch.arange(seq_len), x[:, :1] + 2 * torch.arange(seq_len))
        torch.testing.assert_close(y, x + 1)  # y is x shifted by one, across shard boundaries too
        assert int(y.max()) <= 2499


def test_loader_is_deterministic_per_seed_and_rank(counting_shards):
    def batches(seed, rank=0, world_size=1):
        loader = Loader(counting_shards, seed, torch.device("cpu"), rank, world_size)
        return torch.cat([loader.next_batch(8, 16)[0] for _ in range(3)])

    assert torch.equal(batches(1), batches(1))
    assert not torch.equal(batches(1), batches(2))
    assert torch.equal(batches(1, 1, 2), batches(1, 1, 2))
    assert not torch.equal(batches(1, 0, 2), batches(1, 1, 2))


def test_loader_refuses_windows_longer_than_the_data(counting_shards):
    with pytest.raises(ValueError, match="2501 tokens does not fit in the 2500 tokens"):
        Loader(counting_shards, 0, torch.device("cpu")).next_batch(1, 2500)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        Loader(counting_shards, 0, torch.device("cpu"), rank=2, world_size=2)


def test_open_split_and_read_split_tokens(cache):
    directory = dataset_dir("fineweb")
    directory.mkdir(parents=True)
    val = np.arange(4000) % 100
    val[::50] = EOT_TOKEN
    write_shard(directory / "fineweb_val_000000.bin", val)
    write_shard(directory / "fineweb_train_000001.bin", np.arange(3000))
    finalize_fineweb(directory, ["fineweb_train_000001.bin"], "fineweb_val_000000.bin")

    tokens = np.concatenate(
        [read_split_tokens("fineweb", "val"), read_split_tokens("fineweb", "holdout")]
    )
    np.testing.assert_array_equal(tokens, val)
    x, _ = open_split("fineweb", "train", seed=0, device=torch.device("cpu")).next_batch(2, 5)
    assert int(x.max()) < 3000
    with pytest.raises(ValueError, match="has splits .* not 'test'"):
        read_split_tokens("fineweb", "test")
    (directory / "val_000.bin").unlink()
    with pytest.raises(DataMissingError, match="prepare fineweb --shards N --force"):
        read_split_tokens("fineweb", "val")
