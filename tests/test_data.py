"""Token memmaps, headers, the embedded corpus, and deterministic sharded batches."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lasp.parallel import unshard_sequence
from lasp.train import data as D
from lasp.train import tokenizer as T
from lasp.train.data_cli import main as data_main


@pytest.fixture()
def text_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n" * 50)
    (src / "b.py").write_text("def f(x):\n    return x + 1\n" * 40)
    (src / "sub").mkdir()
    (src / "sub" / "c.txt").write_text("héllo ünïcode\n" * 30)
    return src


@pytest.fixture()
def dataset(tmp_path, text_dir):
    out = tmp_path / "ds"
    D.prepare([str(text_dir)], str(out), "bytes")
    return D.TokenDataset(str(out))


def test_prepare_round_trip(dataset, text_dir, tmp_path):
    files = sorted(p for p in text_dir.rglob("*") if p.is_file())
    expected = b"".join(p.read_bytes() + T.DOC_SEPARATOR for p in files)
    assert dataset.header["dtype"] == "uint8" and dataset.vocab_size == 256  # byte tokens: one byte each
    assert os.path.getsize(os.path.join(dataset.path, D.TOKENS)) == len(expected)
    assert dataset.num_tokens == len(expected)
    assert bytes(np.asarray(dataset.tokens, dtype=np.uint8)) == expected
    assert T.ByteTokenizer().decode(T.ByteTokenizer().encode("héllo")) == "héllo"
    # a dataset written before uint8 (byte tokens as uint16) still reads the same tokens
    old = tmp_path / "old"
    old.mkdir()
    (old / D.TOKENS).write_bytes(np.asarray(dataset.tokens, dtype=np.uint16).tobytes())
    (old / D.HEADER).write_text(json.dumps({**dataset.header, "dtype": "uint16", "document_index": None}))
    assert np.array_equal(np.asarray(D.TokenDataset(str(old)).tokens), np.asarray(dataset.tokens))


def test_prepare_skips_binary_files_and_prints_progress(tmp_path, text_dir, capsys):
    import gzip

    (text_dir / "data.gz").write_bytes(gzip.compress(b"hello " * 100))
    (text_dir / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    lines = []
    header = D.prepare([str(text_dir)], str(tmp_path / "o"), "bytes", log=lines.append, progress_every_s=0)
    assert header["documents"] == 3 and header["skipped_files"] == 2
    assert any("files," in line and "tokens" in line for line in lines), lines
    assert "skipped 2 binary file(s)" in lines[-1] and "data.gz" in lines[-1] and "latin1.txt" in lines[-1]
    assert data_main(["prepare", "--input", str(text_dir), "--output", str(tmp_path / "o2"), "--progress-every", "0"]) == 0
    err = capsys.readouterr().err
    assert "lasp data: 1/5 files," in err and "lasp data: warning: skipped 2 binary file(s)" in err
    with pytest.raises(ValueError, match="every one of the 1 files is binary"):
        D.prepare([str(text_dir / "data.gz")], str(tmp_path / "o3"), "bytes")


def test_cli_prepare(tmp_path, text_dir, capsys):
    assert data_main(["prepare", "--input", str(text_dir / "a.txt"), str(text_dir / "sub"), "--output", str(tmp_path / "o")]) == 0
    assert "tokens" in capsys.readouterr().out
    assert D.read_header(str(tmp_path / "o"))["documents"] == 2
    assert data_main(["prepare", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o2")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def _corrupt(path, how):
    header_path = os.path.join(path, D.HEADER)
    header = json.loads(open(header_path).read())
    if how == "not-json":
        open(header_path, "w").write("{not json")
        return "not JSON"
    if how == "wrong-format":
        header["format"] = "something-else"
    elif how == "missing-key":
        del header["num_tokens"]
    elif how == "bad-dtype":
        header["dtype"] = "float32"
    elif how == "size-mismatch":
        header["num_tokens"] += 7
    open(header_path, "w").write(json.dumps(header))
    return {"wrong-format": "expected format", "missing-key": "missing 'num_tokens'", "bad-dtype": "dtype must be one of",
            "size-mismatch": "bytes"}[how]


@pytest.mark.parametrize("how", ["not-json", "wrong-format", "missing-key", "bad-dtype", "size-mismatch"])
def test_corrupt_header_is_a_clear_error(dataset, how):
    needle = _corrupt(dataset.path, how)
    with pytest.raises(ValueError, match="corrupt data header") as err:
        D.TokenDataset(dataset.path)
    assert needle in str(err.value) and D.HEADER in str(err.value)


def test_missing_data_path(tmp_path):
    with pytest.raises(ValueError, match="data.path: no such dataset directory"):
        D.TokenDataset(str(tmp_path / "missing"))


def test_check_fits(dataset):
    with pytest.raises(ValueError, match="fewer than train.seq_len"):
        dataset.check_fits(dataset.num_tokens)
    with pytest.raises(ValueError, match="exceeds the model's vocab_size"):
        dataset.check_fits(16, model_vocab_size=128)


def test_windows_deterministic_by_seed_and_step(dataset):
    spec = D.BatchSpec(seq_len=16, micro_batch_size=2, grad_accum=2, dp_size=2, seed=3)
    a = D.window_starts(spec, 5, dataset.num_tokens)
    assert len(a) == spec.windows_per_step == 8
    assert np.array_equal(a, D.window_starts(spec, 5, dataset.num_tokens))
    assert not np.array_equal(a, D.window_starts(spec, 6, dataset.num_tokens))
    assert not np.array_equal(a, D.window_starts(D.BatchSpec(16, 2, 2, 2, seed=4), 5, dataset.num_tokens))
    assert a.min() >= 0 and a.max() + spec.seq_len + 1 <= dataset.num_tokens


@pytest.mark.parametrize("sp,layout", [(1, "contiguous"), (2, "contiguous"), (4, "contiguous"), (2, "zigzag"), (4, "zigzag")],
                         ids=lambda v: str(v))
def test_labels_shifted_before_sharding(dataset, sp, layout):
    spec = D.BatchSpec(seq_len=32, micro_batch_size=3, grad_accum=1, dp_size=1, seed=0)
    shards = [D.micro_batch(dataset, spec, 2, 0, 0, r, sp, layout) for r in range(sp)]
    inputs = unshard_sequence([s[0] for s in shards], layout)
    labels = unshard_sequence([s[1] for s in shards], layout)
    starts = D.window_starts(spec, 2, dataset.num_tokens)[:3]
    windows = torch.from_numpy(np.stack([np.asarray(dataset.tokens[s : s + 33], dtype=np.int64) for s in starts]))
    assert torch.equal(inputs, windows[:, :-1]) and torch.equal(labels, windows[:, 1:])
    if sp > 1 and layout == "contiguous":  # a shard's last label is the next shard's first input
        assert torch.equal(shards[0][1][:, -1], shards[1][0][:, 0])
    for x, y in shards:
        assert x.shape == y.shape == (3, 32 // sp) and x.dtype == torch.int64


def test_dp_split_covers_the_same_global_batch(dataset):
    """DP ranks' micro-batches together are the single-rank micro-batch (the global batch does
    not depend on the DP split), micro-step by micro-step."""
    one = D.BatchSpec(seq_len=16, micro_batch_size=4, grad_accum=2, dp_size=1, seed=1)
    two = D.BatchSpec(seq_len=16, micro_batch_size=2, grad_accum=2, dp_size=2, seed=1)
    four = D.BatchSpec(seq_len=16, micro_batch_size=1, grad_accum=2, dp_size=4, seed=1)
    for micro in range(2):
        ref = D.micro_batch(dataset, one, 4, micro, 0, 0, 1, "contiguous")[0]
        for spec in (two, four):
            parts = [D.micro_batch(dataset, spec, 4, micro, d, 0, 1, "contiguous")[0] for d in range(spec.dp_size)]
            assert torch.equal(torch.cat(parts), ref)


def test_embedded_corpus(tmp_path, monkeypatch):
    files = D.stdlib_sources()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    monkeypatch.setattr(D, "stdlib_sources", lambda: files[:5])  # keep the test quick
    path = D.embedded_corpus(str(tmp_path))
    ds = D.TokenDataset(path)
    assert ds.header["documents"] == 5 and ds.num_tokens == sum(f.stat().st_size + 1 for f in files[:5])
    assert D.embedded_corpus(str(tmp_path)) == path  # prepared once, reused


def test_tokenizers_json_without_package_is_clear(tmp_path):
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="'tokenizers' package is not installed"):
            T.load_tokenizer(str(tmp_path / "tok.json"))
    else:
        with pytest.raises(ValueError, match="no such tokenizers JSON"):
            T.load_tokenizer(str(tmp_path / "tok.json"))


def _bpe(tmp_path, text_dir, specials):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(p) for p in text_dir.rglob("*") if p.is_file()], trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    tok.save(str(tmp_path / "tok.json"))
    return tok


def test_tokenizers_json(tmp_path, text_dir):
    tok = _bpe(tmp_path, text_dir, ["[UNK]", "</s>"])
    assert data_main(["prepare", "--input", str(text_dir), "--output", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tok.json")]) == 0
    ds = D.TokenDataset(str(tmp_path / "o"))
    assert ds.header["dtype"] == "uint8" and ds.vocab_size == tok.get_vocab_size() <= 256  # the smallest type that holds it
    first = (text_dir / "a.txt").read_text()
    n = len(tok.encode(first).ids)
    assert np.array_equal(np.asarray(ds.tokens[:n]), tok.encode(first).ids)
    # the tokenizer's EOS separates the documents (issue 13 item 14)
    eos = tok.token_to_id("</s>")
    assert ds.header["separator"] == eos and int(ds.tokens[n]) == eos
    assert int((np.asarray(ds.tokens) == eos).sum()) == ds.header["documents"]
    # the tokenizer is copied into the dataset: moving the dataset and deleting the original keeps it
    assert ds.header["tokenizer"] == D.TOKENIZER_FILE and (tmp_path / "o" / D.TOKENIZER_FILE).is_file()
    os.remove(tmp_path / "tok.json")
    os.rename(tmp_path / "o", tmp_path / "moved")
    assert D.TokenDataset(str(tmp_path / "moved")).tokenizer().decode(tok.encode("hello world").ids) == "hello world"
    # a dataset of an older lasp names the absolute path of a file that is gone: its own copy is used,
    # and without one the error names both
    header = json.loads((tmp_path / "moved" / D.HEADER).read_text())
    (tmp_path / "moved" / D.HEADER).write_text(json.dumps({**header, "tokenizer": str(tmp_path / "tok.json")}))
    assert D.TokenDataset(str(tmp_path / "moved")).tokenizer().vocab_size == tok.get_vocab_size()
    os.remove(tmp_path / "moved" / D.TOKENIZER_FILE)
    with pytest.raises(ValueError, match="the tokenizer of .* is gone"):
        D.TokenDataset(str(tmp_path / "moved")).tokenizer()


def test_tokenizers_json_without_eos_is_a_clear_error(tmp_path, text_dir, capsys):
    _bpe(tmp_path, text_dir, ["[UNK]", "<sep>"])
    argv = ["prepare", "--input", str(text_dir), "--output", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tok.json")]
    assert data_main(argv) == 2
    assert "no end-of-text token" in capsys.readouterr().err
    assert data_main(argv + ["--eos-token", "<sep>"]) == 0


def test_prepare_refuses_non_empty_output_unless_overwrite(tmp_path, text_dir, capsys):
    out = tmp_path / "o"
    assert data_main(["prepare", "--input", str(text_dir / "a.txt"), "--output", str(out)]) == 0
    first = D.read_header(str(out))
    assert data_main(["prepare", "--input", str(text_dir / "b.py"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--overwrite" in err
    assert D.read_header(str(out)) == first  # untouched
    assert data_main(["prepare", "--input", str(text_dir / "b.py"), "--output", str(out), "--overwrite"]) == 0
    assert D.read_header(str(out))["num_tokens"] == (text_dir / "b.py").stat().st_size + 1
    assert sorted(os.listdir(tmp_path)) == ["o", "src"]  # no temporary directory left behind


def test_prepare_skips_hidden_directories_and_files(tmp_path, text_dir):
    (text_dir / ".git").mkdir()
    (text_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (text_dir / ".hidden.txt").write_text("secret\n")
    D.prepare([str(text_dir)], str(tmp_path / "o"), "bytes")
    assert D.read_header(str(tmp_path / "o"))["documents"] == 3


def test_max_token_id_recorded_and_checked(tmp_path, dataset):
    assert dataset.header["max_token_id"] == int(np.asarray(dataset.tokens).max())
    # a dataset whose header claims a small vocab but holds a larger id (no max_token_id: scanned)
    bad = tmp_path / "bad"
    bad.mkdir()
    ids = np.arange(200, dtype=np.uint16)
    (bad / D.TOKENS).write_bytes(ids.tobytes())
    (bad / D.HEADER).write_text(json.dumps({"format": D.FORMAT, "dtype": "uint16", "num_tokens": 200, "vocab_size": 128}))
    with pytest.raises(ValueError, match="holds token id 199, but the model's vocab_size is 128"):
        D.TokenDataset(str(bad)).check_fits(16, 128)


def test_token_ids_are_scanned_not_read_from_the_header(tmp_path):
    """Issue 23 F5: a tokens.bin changed after prepare (ids >= the model's vocab) with its header
    intact is caught before training, naming the file and the first bad offset; the scan is cached."""
    path = tmp_path / "ds"
    path.mkdir()
    (path / D.TOKENS).write_bytes(np.arange(200, dtype=np.uint16).tobytes())
    (path / D.HEADER).write_text(json.dumps({"format": D.FORMAT, "dtype": "uint16", "num_tokens": 200, "vocab_size": 300, "max_token_id": 199}))
    D.TokenDataset(str(path)).check_fits(16, 300)
    assert json.loads((path / D.SCAN_CACHE).read_text())["max_token_id"] == 199
    tokens = np.fromfile(path / D.TOKENS, dtype=np.uint16)
    tokens[37] = 310  # the header still says max_token_id 199
    tokens.tofile(path / D.TOKENS)
    with pytest.raises(ValueError, match=r"holds token id 310, but the model's vocab_size is 300 .*offset 37 of .*tokens.bin; its "
                                         r"header.json says max_token_id 199: tokens.bin was changed after"):
        D.TokenDataset(str(path)).check_fits(16, 300)
