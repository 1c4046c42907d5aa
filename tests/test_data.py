import numpy as np
import pytest
from conftest import SHARED_CORPUS

from duollm.config import load_config
from duollm.data import corpus as data
from duollm.data.cache import cached_meta, eval_tokens, load_tokens, prepare_data


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
    assert data.read_corpus(f"file:{tmp_path}") == f"alpha{data.EOS}beta"  # files are documents
    assert data.read_corpus(f"file:{tmp_path}/**/*.txt") == f"alpha{data.EOS}beta"


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
    assert data.read_corpus(f"hf:{tmp_path}") == f"hello world{data.EOS}second row"
    with pytest.raises(ValueError, match="no column 'body'"):
        data.read_corpus(f"hf:{tmp_path}", text_column="body")


def test_prepare_data_caches_tokens(tmp_path):
    cfg = load_config("tiny", [f"data.spec=file:{SHARED_CORPUS}"])
    meta = prepare_data(cfg, tmp_path, log=lambda *_: None)
    train = load_tokens(tmp_path, "train")
    assert len(train) == meta["train_tokens"] > 100_000 and train.dtype == np.uint16
    assert int(np.max(train)) < cfg.model.vocab_size
    assert prepare_data(cfg, tmp_path, log=lambda *_: None) == meta  # second call reuses the cache
    idx_ST, tgt_ST = eval_tokens(tmp_path, cfg, max_tokens=320)
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


# ----------------------------------------------------------------------------- documents end with EOS


def test_documents_are_separated_by_one_eos_token():
    """Documents join with <|endoftext|>, which the trained BPE encodes as its one special id (never
    learned as merges of its characters), in both splits and across chunk boundaries."""
    from duollm.config import load_config

    cfg = load_config("tiny")
    prepared = data.build_data(cfg, log=lambda *_: None)
    tok = prepared.tokenizer
    eos = tok.backend.token_to_id(data.EOS)
    assert tok.encode(data.EOS) == [eos] and tok.separator == data.EOS
    assert tok.encode(f"one{data.EOS}two").count(eos) == 1
    assert not any("endoftext" in t for t in tok.backend.get_vocab() if t != data.EOS)
    docs = [d for d in data.read_documents(cfg.data.spec) if d.strip()]
    ids = np.concatenate([prepared.splits["train"], prepared.splits["val"]])
    assert int((ids == eos).sum()) == len(docs) - 1 > 50  # the embedded corpus' topics: one EOS between each


def test_a_chunk_boundary_never_cuts_a_separator():
    text = "a" * 10 + data.EOS + "b" * 30
    for chunk in range(5, 30):
        train, val = data.split_text(text, chunk, 0.5)
        assert sum(map(len, train + val)) == len(text) and sum(c.count(data.EOS) for c in train + val) == 1, chunk
    first = data.read_documents("builtin:pydoc-topics")[0]
    assert data.read_corpus("builtin:pydoc-topics", max_chars=len(first) + 5) == first  # the cap drops a half separator


def test_empty_documents_add_no_separators(tmp_path):
    for name, text in (("a.txt", "alpha"), ("b.txt", " \n"), ("c.txt", "gamma")):
        (tmp_path / name).write_text(text)
    assert data.read_corpus(f"file:{tmp_path}") == f"alpha{data.EOS}gamma"


# ----------------------------------------------------------------------------- local datasets through hf:


ROWS = [{"text": f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40, "n": i} for i in range(60)]


def test_a_save_to_disk_folder_loads_with_load_from_disk(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select(range(2)), "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "notrain"))

    def no_scanning(*args, **kwargs):
        raise AssertionError("a saved dataset must not go through load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_scanning)
    assert data.read_corpus(f"hf:{tmp_path / 'saved'}") == data.EOS.join(r["text"] for r in ROWS)
    assert data.read_corpus(f"hf:{tmp_path / 'dict'}") == data.EOS.join(r["text"] for r in ROWS[:2])  # its train split
    with pytest.raises(ValueError, match="has no train split .it has test"):
        data.read_corpus(f"hf:{tmp_path / 'notrain'}")
    with pytest.raises(ValueError, match="has no column 'body'"):
        data.read_corpus(f"hf:{tmp_path / 'saved'}", text_column="body")
    assert len(data.read_corpus(f"hf:{tmp_path / 'saved'}", max_chars=100)) == 100


def test_a_saved_dataset_trains(tmp_path):
    datasets = pytest.importorskip("datasets")
    from conftest import cli

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    cli("train", "--config", "tiny", "--out", tmp_path / "run", "--data", f"hf:{tmp_path / 'saved'}",
        "--set", "train.steps=2", "train.eval_every=2", "train.save_every=2")
    meta = cached_meta(load_config("tiny", [f"data.spec=hf:{tmp_path / 'saved'}"]), tmp_path / "run")
    assert meta["chars"] == len(data.EOS.join(r["text"] for r in ROWS))


def write_builder_files(folder, builder):
    """Two files for datasets' packaged builder, 'a' and 'b' rows."""
    datasets = pytest.importorskip("datasets")
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"json": "jsonl", "parquet": "parquet", "csv": "csv"}[builder]
    for part in ("a", "b"):
        ds = datasets.Dataset.from_list([{"body": f"{part}{i}"} for i in range(3)])
        getattr(ds, f"to_{builder}")(str(folder / f"{part}.{ext}"))
    return ext


@pytest.mark.parametrize("builder", ["json", "parquet", "csv"])
def test_file_builders_read_exactly_data_files(tmp_path, monkeypatch, builder):
    ext = write_builder_files(tmp_path / "corpus", builder)
    cwd = tmp_path / "cwd"
    write_builder_files(cwd, builder)  # decoys where load_dataset would look without data_files
    (cwd / "decoy.json").write_text('{"body": "DECOY"}\n')
    monkeypatch.chdir(cwd)
    files = f"{tmp_path}/corpus/*.{ext}"
    assert data.read_corpus(f"hf:{builder}", "body", data_files=files) == data.EOS.join(
        ["a0", "a1", "a2", "b0", "b1", "b2"])
    one = f"{tmp_path}/corpus/b.{ext}, {tmp_path}/corpus/b.{ext}"  # comma-separated; a file named twice reads once
    assert data.read_corpus(f"hf:{builder}", "body", data_files=one) == data.EOS.join(["b0", "b1", "b2"])
    assert data.read_corpus(f"hf:{builder}", "body", max_chars=4, data_files=files) == "a0"
    with pytest.raises(ValueError, match="set data.data_files"):
        data.read_corpus(f"hf:{builder}", "body")
    with pytest.raises(ValueError, match=r"data.data_files: no file matches .*\*\.nope"):
        data.read_corpus(f"hf:{builder}", "body", data_files=f"{tmp_path}/corpus/*.nope")


def test_data_files_are_validated_with_the_config(tmp_path, monkeypatch):
    from conftest import assert_one_line_error, cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "decoy.json").write_text('{"text": "DECOY"}\n')
    with pytest.raises(ValueError, match="set data.data_files"):
        load_config("tiny", ["data.spec=hf:json"])
    with pytest.raises(ValueError, match="data.data_files is read only by hf:json, hf:parquet, hf:csv"):
        load_config("tiny", ["data.data_files=x.jsonl"])
    proc = cli("train", "--config", "tiny", "--out", tmp_path / "run", "--data", "hf:json", check=False)
    assert proc.returncode == 2
    assert_one_line_error(proc, "data.data_files")
    assert not (tmp_path / "run").exists()


def test_data_files_take_part_in_the_fingerprint():
    import hashlib
    import json

    base = load_config("tiny", ["data.spec=hf:json", "data.data_files=a.jsonl"])
    other = load_config("tiny", ["data.spec=hf:json", "data.data_files=b.jsonl"])
    assert data.data_fingerprint(base) != data.data_fingerprint(other)
    default = load_config("tiny")  # unset: the fingerprint of caches made before the key existed
    legacy = {k: v for k, v in default.data.__dict__.items() if k != "data_files"}
    want = hashlib.sha256(json.dumps([legacy, default.model.vocab_size]).encode()).hexdigest()[:16]
    assert data.data_fingerprint(default) == want


def test_each_evaluation_window_knows_the_document_it_starts_in():
    """Windows of one document are one unit when intervals resample (DESIGN 4.4a): the document of a window is
    the number of separators before its first token, for the windows `sequences` takes, in its order."""
    from duollm.data.corpus import sequence_documents, sequences

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, 4000)
    tokens[rng.choice(4000, 12, replace=False)] = 0  # separator id 0: 13 documents
    for cap in (None, 640, 64):
        idx_ST, _ = sequences(tokens, 32, cap)
        doc_S = sequence_documents(tokens, 32, cap, sep_id=0)
        assert len(doc_S) == len(idx_ST)
        for s, row in enumerate(idx_ST.numpy()):
            start = next(i for i in range(len(tokens) - 32) if (tokens[i:i + 32] == row).all())
            assert doc_S[s] == (tokens[:start] == 0).sum()
    assert len(set(sequence_documents(tokens, 32, None, 0).tolist())) == 13
