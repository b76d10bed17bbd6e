"""data/: building datasets end to end (text, embedded, FineWeb's post-download steps).

Every dataset goes into a temporary cache; no test touches the network.
"""

import json
import random
import time

import huggingface_hub
import numpy as np
import pytest

from data.__main__ import main
from data.cache import DataMissingError, dataset_dir, load_meta
from data.corpus import CorpusError, split_of, text_documents
from data.fineweb import EOT_TOKEN, VAL_FILE, finalize_fineweb, prepare_fineweb, train_file
from data.prepare import build_dataset, prepare_embedded, prepare_text
from data.shards import read_shard, write_shard
from data.tokenizer import load_tokenizer

VOCAB = 320


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDLOOP_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


@pytest.fixture
def corpus(tmp_path):
    """A directory `corpus/` of small text files with at least 3 in each split."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    rng = random.Random(0)
    words = ["".join(rng.choices("aeioubcdfgklmnprst", k=rng.randint(2, 7))) for _ in range(200)]
    counts = {"train": 0, "val": 0, "holdout": 0}
    i = 0
    while min(counts.values()) < 3 or counts["train"] < 20:
        name = f"sub/doc_{i:03d}.txt" if i % 3 else f"doc_{i:03d}.md"
        split = split_of(f"corpus/{name}")
        if split == "train" and counts["train"] >= 20:
            i += 1
            continue
        counts[split] += 1
        (root / name).write_text(" ".join(rng.choices(words, k=300)) + "\n", encoding="utf-8")
        i += 1
    (root / "image.png").write_bytes(b"\x89PNG\0\0")  # not a text suffix: ignored
    (root / ".hidden.txt").write_text("hidden")  # hidden: ignored
    return root


def test_prepare_text_end_to_end(cache, corpus):
    meta = prepare_text([corpus], vocab_size=VOCAB)
    directory = cache / "text"
    assert load_meta("text") == meta
    assert meta["name"] == "text" and meta["kind"] == "text"
    assert meta["vocab_size"] == VOCAB and meta["tokenizer"] == "tokenizer.json"
    assert meta["splits"] == {s: [f"{s}_000.bin"] for s in ("train", "val", "holdout")}
    assert len(meta["fingerprint"]) == 64 and meta["created_with"]["python"]

    documents = text_documents([corpus])
    for split in ("train", "val", "holdout"):
        docs = [d for d in documents if split_of(d.key) == split]
        assert meta["documents"][split] == len(docs)
        assert meta["bytes"][split] == sum(len(d.text.encode()) for d in docs)
        tokens = read_shard(directory / meta["splits"][split][0])
        assert len(tokens) == meta["tokens"][split]
        # one <|endoftext|> before each document, and it comes first
        assert tokens[0] == meta["eot_token"]
        assert np.count_nonzero(tokens == meta["eot_token"]) == len(docs)
        enc = load_tokenizer(directory)
        assert enc.decode(tokens.tolist()) == "".join("<|endoftext|>" + d.text for d in docs)
        token_bytes = np.load(directory / "token_bytes.npy")
        assert token_bytes[tokens].sum() == meta["bytes"][split]
    assert not list(directory.glob(".*"))  # no temporary file left behind


def test_prepare_text_is_idempotent_and_fingerprinted(cache, corpus, capsys):
    first = prepare_text([corpus], vocab_size=VOCAB)
    shard = cache / "text" / "train_000.bin"
    mtime = shard.stat().st_mtime_ns
    assert prepare_text([corpus], vocab_size=VOCAB) == first
    assert "nothing to do" in capsys.readouterr().out
    assert shard.stat().st_mtime_ns == mtime

    assert (
        prepare_text([corpus], vocab_size=VOCAB, force=True)["fingerprint"]
        == (first["fingerprint"])
    )
    assert shard.stat().st_mtime_ns != mtime

    changed = next(corpus.glob("sub/*.txt"))
    changed.write_text(changed.read_text() + "one more line\n")
    second = prepare_text([corpus], vocab_size=VOCAB)  # a changed corpus rebuilds by itself
    assert second["fingerprint"] != first["fingerprint"]
    assert load_meta("text")["fingerprint"] == second["fingerprint"]
    third = prepare_text([corpus], vocab_size=VOCAB + 8)
    assert third["fingerprint"] != second["fingerprint"] and third["vocab_size"] == VOCAB + 8


def test_prepare_rebuilds_an_incomplete_dataset(cache, corpus, capsys):
    prepare_text([corpus], vocab_size=VOCAB)
    (cache / "text" / "val_000.bin").unlink()
    prepare_text([corpus], vocab_size=VOCAB)
    assert "building" in capsys.readouterr().out
    assert (cache / "text" / "val_000.bin").exists()


def test_killed_prepare_never_looks_complete(cache, corpus, monkeypatch):
    prepare_text([corpus], vocab_size=VOCAB)

    def killed(path, tokens):
        raise KeyboardInterrupt

    monkeypatch.setattr("data.prepare.write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_text([corpus], vocab_size=VOCAB, force=True)
    with pytest.raises(DataMissingError, match="prepare text PATH..."):
        load_meta("text")


def test_large_splits_are_sharded_and_stale_shards_removed(cache, corpus):
    documents = text_documents([corpus])
    meta = build_dataset("many", "text", documents, "test", VOCAB, shard_tokens=500)
    files = meta["splits"]["train"]
    assert len(files) > 2 and files[:2] == ["train_000.bin", "train_001.bin"]
    sizes = [len(read_shard(cache / "many" / f)) for f in files]
    assert sizes[:-1] == [500] * (len(files) - 1) and sum(sizes) == meta["tokens"]["train"]
    build_dataset("many", "text", documents, "test", VOCAB, force=True)
    assert sorted(p.name for p in (cache / "many").glob("*.bin")) == [
        "holdout_000.bin",
        "train_000.bin",
        "val_000.bin",
    ]


def test_text_corpus_errors(tmp_path, corpus):
    with pytest.raises(CorpusError, match=f"{tmp_path / 'nope'}: no such file or directory"):
        text_documents([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.bin").write_bytes(b"\0")
    with pytest.raises(CorpusError, match=f"{tmp_path / 'empty'}: no non-empty UTF-8 file"):
        text_documents([tmp_path / "empty"])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(CorpusError, match=f"{latin}: not UTF-8 text"):
        text_documents([latin])
    one = tmp_path / "one.txt"
    one.write_text("only one document")
    with pytest.raises(CorpusError, match="has 1 documents .* split"):
        prepare_text([one], vocab_size=VOCAB)
    # A file named directly is read whatever its suffix, keyed by its name.
    (tmp_path / "notes.log").write_text("log")
    assert [d.key for d in text_documents([tmp_path / "notes.log"])] == ["notes.log"]


def test_cli_prepare_text(cache, corpus, tmp_path, capsys):
    main(["prepare", "text", str(corpus), "--name", "mine", "--vocab-size", str(VOCAB)])
    assert load_meta("mine")["vocab_size"] == VOCAB
    assert "done in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'missing'}: no such file"):
        main(["prepare", "text", str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        main(["prepare", "text", str(corpus), "--name", "../escape"])
    with pytest.raises(SystemExit):
        main(["prepare", "fineweb", "--shards", "0"])


# ---------------------------------------------------------------- FineWeb


def fake_fineweb_shard(path, n_tokens, seed):
    """GPT-2-like tokens with an <|endoftext|> starting each ~100-token document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, EOT_TOKEN, size=n_tokens)
    tokens[rng.random(n_tokens) < 0.01] = EOT_TOKEN
    tokens[0] = EOT_TOKEN
    write_shard(path, tokens)
    return tokens


def test_finalize_fineweb(cache):
    directory = dataset_dir("fineweb")
    directory.mkdir(parents=True)
    val = fake_fineweb_shard(directory / VAL_FILE, 10_001, seed=0)
    trains = [fake_fineweb_shard(directory / train_file(i), 5000, seed=i) for i in (1, 2)]
    meta = finalize_fineweb(directory, [train_file(1), train_file(2)], VAL_FILE)

    assert load_meta("fineweb") == meta
    assert (meta["vocab_size"], meta["eot_token"], meta["tokenizer"]) == (50257, 50256, "gpt2")
    assert meta["splits"] == {
        "train": ["fineweb_train_000001.bin", "fineweb_train_000002.bin"],
        "val": ["val_000.bin"],
        "holdout": ["holdout_000.bin"],
    }
    val_half, holdout = (
        read_shard(directory / "val_000.bin"),
        read_shard(directory / "holdout_000.bin"),
    )
    np.testing.assert_array_equal(np.concatenate([val_half, holdout]), val)
    assert len(val_half) >= 10_001 // 2 and holdout[0] == EOT_TOKEN  # cut at a document start
    assert not np.any(val_half[10_001 // 2 :] == EOT_TOKEN)
    assert meta["tokens"] == {"train": 10_000, "val": len(val_half), "holdout": len(holdout)}
    assert meta["documents"]["train"] == sum(int((t == EOT_TOKEN).sum()) for t in trains)
    assert meta["documents"]["val"] + meta["documents"]["holdout"] == int((val == EOT_TOKEN).sum())

    assert finalize_fineweb(directory, [train_file(1), train_file(2)], VAL_FILE) == meta
    # The fingerprint reads names, sizes and headers (hub files never change under a name).
    fake_fineweb_shard(directory / train_file(2), 5001, seed=2)
    changed = finalize_fineweb(directory, [train_file(1), train_file(2)], VAL_FILE)
    assert changed["fingerprint"] != meta["fingerprint"]


def test_prepare_fineweb_downloads_then_is_a_no_op(cache, monkeypatch, capsys):
    calls = []

    def fake_download(repo_id, filename, repo_type, local_dir, force_download):
        assert (repo_id, repo_type) == ("kjj0/fineweb10B-gpt2", "dataset")
        calls.append(filename)
        return str(fake_fineweb_shard(local_dir / filename, 3000, seed=len(calls)))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    meta = prepare_fineweb(shards=2)
    assert calls == [VAL_FILE, train_file(1), train_file(2)]
    assert meta["tokens"]["train"] == 6000
    assert prepare_fineweb(shards=2) == meta and len(calls) == 3
    assert "nothing to do" in capsys.readouterr().out
    prepare_fineweb(shards=3)  # more shards asked: fetch (the hub client skips finished files)
    assert load_meta("fineweb")["splits"]["train"][-1] == train_file(3)


def test_prepare_fineweb_network_failure_says_what_to_do(cache, monkeypatch):
    def offline(**kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataMissingError, match="Network is unreachable.*--shards 4"):
        prepare_fineweb(shards=4)


def test_fineweb_corrupt_download_is_refused(cache):
    directory = dataset_dir("fineweb")
    directory.mkdir(parents=True)
    fake_fineweb_shard(directory / VAL_FILE, 1000, seed=0)
    fake_fineweb_shard(directory / train_file(1), 1000, seed=1)
    path = directory / train_file(1)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{path}: header says 1000 tokens.*--shards N --force"):
        finalize_fineweb(directory, [train_file(1)], VAL_FILE)
    assert not (directory / "meta.json").exists()


# ---------------------------------------------------------------- embedded (the real one)


@pytest.mark.slow
def test_prepare_embedded_for_real(cache):
    started = time.perf_counter()
    meta = prepare_embedded()
    seconds = time.perf_counter() - started
    assert seconds < 60, f"prepare embedded took {seconds:.0f} s"
    assert meta["vocab_size"] == 4096 and meta["eot_token"] == 4092
    assert meta["documents"]["train"] > 400 and meta["documents"]["val"] > 10
    assert meta["tokens"]["train"] > 1_000_000 and meta["tokens"]["val"] > 30_000
    assert 2.5 < meta["bytes"]["train"] / meta["tokens"]["train"] < 5
    assert json.loads((cache / "embedded" / "meta.json").read_text()) == meta
    started = time.perf_counter()
    assert prepare_embedded() == meta
    assert time.perf_counter() - started < 5  # the no-op only re-reads the corpus
