import numpy as np
import pytest
from conftest import SHARED_CORPUS

from duollm import data, rundir
from duollm.config import load_config


def test_builtin_corpus_is_the_python_docs():
    topics = data.read_corpus("builtin:pydoc-topics")
    full = data.read_corpus("builtin:pydoc")
    assert 400_000 < len(topics) < len(full)
    assert full.startswith(topics)


def test_split_is_deterministic_and_disjoint():
    text = "".join(f"line {i} " for i in range(20_000))
    a = data.split_text(text, 1000, 0.1)
    b = data.split_text(text, 1000, 0.1)
    assert a == b
    train, val = a
    assert len(val) == len(train) // 9 + (1 if len(train) % 9 else 0) or len(val) > 0
    assert not set(train) & set(val)
    assert "".join(sorted(train + val)) == "".join(sorted(text[i:i + 1000] for i in range(0, len(text), 1000)))


def test_bpe_tokenizer_round_trip():
    text = data.read_corpus("builtin:pydoc-topics")[:50_000]
    tok = data.train_bpe([text], 400)
    sample = "The  quick brown fox — naïve café 😀\n\tdef f(x): return x ** 2"
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.vocab_size <= 400
    assert data.train_bpe([text], 400).encode(sample) == tok.encode(sample)  # training is deterministic


def test_file_folder_and_glob_specs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta")
    assert data.read_corpus(f"file:{tmp_path / 'a.txt'}") == "alpha"
    assert data.read_corpus(f"file:{tmp_path}") == "alpha\n\nbeta"
    assert data.read_corpus(f"file:{tmp_path}/**/*.txt") == "alpha\n\nbeta"


@pytest.mark.parametrize("spec,message", [
    ("builtin:nope", "unknown builtin corpus"),
    ("ftp:x", "must start with builtin:, file: or hf:"),
    ("file:/nonexistent/x.txt", "no file matches"),
    ("hf:surely-not-a-dataset-xyz", "cannot load Hugging Face dataset"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        data.read_corpus(spec)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.read_corpus(f"file:{tmp_path / 'empty.txt'}")


def test_hf_dataset_from_a_local_folder(tmp_path):
    """The hf: loader is the real `datasets.load_dataset`, here on a local folder (no Hub)."""
    pytest.importorskip("datasets")
    (tmp_path / "train.jsonl").write_text('{"text": "hello world"}\n{"text": "second row"}\n')
    assert data.read_corpus(f"hf:{tmp_path}") == "hello world\n\nsecond row"
    with pytest.raises(ValueError, match="no column 'body'"):
        data.read_corpus(f"hf:{tmp_path}", text_column="body")


def test_prepare_data_caches_tokens(tmp_path):
    cfg = load_config("tiny", [f"data.spec=file:{SHARED_CORPUS}"])
    meta = rundir.prepare_data(cfg, tmp_path, log=lambda *_: None)
    train = rundir.load_tokens(tmp_path, "train")
    assert len(train) == meta["train_tokens"] > 100_000 and train.dtype == np.uint16
    assert int(np.max(train)) < cfg.model.vocab_size
    assert rundir.prepare_data(cfg, tmp_path, log=lambda *_: None) == meta  # second call reuses the cache
    idx_ST, tgt_ST = rundir.eval_tokens(tmp_path, cfg, max_tokens=320)
    assert idx_ST.shape == (10, cfg.train.seq_len)
    assert (idx_ST[:, 1:] == tgt_ST[:, :-1]).all()  # targets are the next tokens


def test_capped_evaluation_windows_are_whole_spread_and_nested():
    T = 8
    tokens = np.arange(10 * T + 1)  # ten windows; token i has value i
    idx_ST, tgt_ST = data.sequences(tokens, T, max_tokens=5 * T)
    assert (idx_ST[:, 0] // T).tolist() == [0, 5, 2, 7, 1]  # van der Corput: 0, 1/2, 1/4, 3/4, 1/8 of the split
    assert (idx_ST == idx_ST[:, :1] + np.arange(T)).all() and (tgt_ST == idx_ST + 1).all()  # whole windows
    fewer, _ = data.sequences(tokens, T, max_tokens=3 * T)
    assert (fewer == idx_ST[:3]).all()  # a smaller cap is a prefix: oracle and eval rows line up
    all_ST, _ = data.sequences(tokens, T)
    assert sorted((all_ST[:, 0] // T).tolist()) == list(range(10))  # uncapped: every window once
    for W in (1, 2, 3, 7, 64, 1000):
        order = data.window_order(W, W)
        assert sorted(order.tolist()) == list(range(W))
