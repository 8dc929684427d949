"""Calibration sources -> seeded token windows, and the perplexity-eval cut.

The main tokenizer is a real word-level ``tokenizers`` model wrapped in PreTrainedTokenizerFast with a
hand-written vocabulary: word ``w{i}`` has id ``i + 2``, ``</s>`` (EOS) is 1, so every expected token
stream and window is computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slm_dist.calibration import (
    CalibrationDataError,
    contiguous_windows,
    load_calibration,
    load_calibration_parquet,
    perplexity_windows,
    read_records,
    read_texts,
    read_token_rows,
    sample_token_windows,
    save_calibration,
    windows_from_token_rows,
)

EOS = 1
NUM_WORDS = 400


def word_id(i: int) -> int:
    return i + 2


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i}" for i in range(start, stop))


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "</s>": EOS, **{f"w{i}": word_id(i) for i in range(NUM_WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


# ------------------------------------------------------------------------------------ source readers


def test_txt_splits_documents_on_blank_lines(tmp_path: Path) -> None:
    source = tmp_path / "c.txt"
    source.write_text("\n\nfirst doc\nsame doc\n\n\n  \t\nsecond doc\r\n\r\nthird\n  \n", encoding="utf-8")
    assert read_texts(source) == ["first doc\nsame doc", "second doc", "third"]
    assert read_token_rows(source) is None


def test_jsonl_reads_text_field_and_skips_blank_lines(tmp_path: Path) -> None:
    source = tmp_path / "c.jsonl"
    source.write_text('{"text": "a b", "id": 1}\n\n{"text": "c"}\n{"text": "   "}\n', encoding="utf-8")
    assert read_texts(source) == ["a b", "c"]  # whitespace-only document dropped
    assert read_token_rows(source) is None


def test_jsonl_bad_json_names_line(tmp_path: Path) -> None:
    source = tmp_path / "c.jsonl"
    source.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"line 3 is not valid JSON"):
        read_texts(source)


def test_jsonl_missing_text_field_names_line_and_keys(tmp_path: Path) -> None:
    source = tmp_path / "c.jsonl"
    source.write_text('{"text": "a"}\n{"content": "b"}\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"line 2 has no string field 'text' \(found \['content'\]\)"):
        read_texts(source)
    source.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"line 1 has no string field 'text'"):
        read_texts(source)


def test_parquet_text_column(tmp_path: Path) -> None:
    source = tmp_path / "c.parquet"
    pq.write_table(pa.table({"meta": [1, 2, 3, 4], "text": ["one", None, "", "two three"]}), source)
    assert read_texts(source) == ["one", "two three"]
    assert read_token_rows(source) is None
    assert read_records(source) == ["one", "two three"]


def test_parquet_input_ids_column(tmp_path: Path) -> None:
    source = tmp_path / "c.parquet"
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    pq.write_table(pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int32()))}), source)
    assert read_token_rows(source) == rows
    assert read_records(source) == rows
    with pytest.raises(CalibrationDataError, match=r"no 'text' column; found columns \['input_ids'\]"):
        read_texts(source)


def test_parquet_input_ids_of_wrong_type_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "c.parquet"
    pq.write_table(pa.table({"input_ids": pa.array([[0.5, 1.5]])}), source)
    with pytest.raises(CalibrationDataError, match=r"'input_ids' has type list<\w+: double>"):
        read_token_rows(source)


def write_dataset_folder(folder: Path, tables: list[pa.Table], names: list[str]) -> None:
    """What ``datasets.Dataset.save_to_disk`` writes: Arrow IPC stream shards + state.json + info."""
    folder.mkdir()
    for table, name in zip(tables, names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": "x", "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_datasets_folder_text_in_state_json_order(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    # state.json lists "b" before "a": its order, not the file-name order, is the dataset order.
    write_dataset_folder(
        folder,
        [pa.table({"text": ["first", "second"]}), pa.table({"text": ["third"]})],
        ["data-b.arrow", "data-a.arrow"],
    )
    assert read_texts(folder) == ["first", "second", "third"]
    assert read_token_rows(folder) is None


def test_datasets_folder_input_ids(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    ids = pa.list_(pa.int64())
    write_dataset_folder(
        folder,
        [
            pa.table({"input_ids": pa.array([[1, 2, 3]], type=ids)}),
            pa.table({"input_ids": pa.array([[4, 5, 6]], type=ids)}),
        ],
        ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"],
    )
    assert read_token_rows(folder) == [[1, 2, 3], [4, 5, 6]]


def test_datasets_dict_folder_asks_for_a_split(tmp_path: Path) -> None:
    folder = tmp_path / "dd"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    (folder / "train").mkdir()
    (folder / "test").mkdir()
    with pytest.raises(CalibrationDataError, match=r"DatasetDict with splits \['test', 'train'\]"):
        read_texts(folder)


def test_plain_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("hi")
    message = r"not a `datasets` save_to_disk folder \(found \['notes.md'\]\)"
    with pytest.raises(CalibrationDataError, match=message):
        read_texts(tmp_path)


@pytest.mark.parametrize("content", ["", "\n\n  \n", "\t"])
def test_empty_txt_is_refused(tmp_path: Path, content: str) -> None:
    source = tmp_path / "empty.txt"
    source.write_text(content)
    with pytest.raises(CalibrationDataError, match=r"empty\.txt.*holds no text.*accepted: \.txt"):
        read_texts(source)


def test_unknown_suffix_and_missing_file_name_the_path(tmp_path: Path) -> None:
    source = tmp_path / "c.csv"
    source.write_text("text\nhello\n")
    with pytest.raises(CalibrationDataError, match=r"c\.csv.*suffix '\.csv'.*accepted: \.txt.*\.jsonl.*\.parquet"):
        read_texts(source)
    with pytest.raises(CalibrationDataError, match=r"nope\.txt.*does not exist"):
        read_texts(tmp_path / "nope.txt")


def test_parquet_missing_text_column_names_columns_found(tmp_path: Path) -> None:
    source = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["a"], "id": [1]}), source)
    message = r"c\.parquet.*found columns \['content', 'id'\].*'text'.*'input_ids'"
    with pytest.raises(CalibrationDataError, match=message):
        load_calibration(source, None, num_samples=1, seq_len=2, seed=0)


# ------------------------------------------------------------------------------------ text sampling


def test_documents_are_joined_with_eos_and_cut_into_aligned_windows(tokenizer) -> None:
    texts = ["w0 w1 w2", "w3 w4", "w5 w6 w7 w8"]
    # Stream by hand: 2 3 4 | EOS | 5 6 | EOS | 7 8 9 10  -> 11 tokens, seq_len 3 -> 3 windows, tail [10] dropped.
    expected = {(2, 3, 4), (EOS, 5, 6), (EOS, 7, 8)}
    windows = sample_token_windows(texts, tokenizer, num_samples=3, seq_len=3, seed=0)
    assert windows.dtype == torch.int64 and windows.shape == (3, 3)
    assert {tuple(row) for row in windows.tolist()} == expected


def test_sampled_windows_follow_the_seeded_permutation(tokenizer) -> None:
    texts = [words(0, 100)]  # stream = ids 2..101, 10 windows of 10
    windows = sample_token_windows(texts, tokenizer, num_samples=4, seq_len=10, seed=7)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(7))[:4]
    expected = torch.stack([torch.arange(2 + 10 * int(k), 12 + 10 * int(k)) for k in order])
    assert torch.equal(windows, expected)


def test_sampling_is_deterministic_by_seed_and_differs_across_seeds(tokenizer) -> None:
    texts = [words(0, 150), words(150, 300)]
    first = sample_token_windows(texts, tokenizer, num_samples=8, seq_len=16, seed=3)
    again = sample_token_windows(texts, tokenizer, num_samples=8, seq_len=16, seed=3)
    other = sample_token_windows(texts, tokenizer, num_samples=8, seq_len=16, seed=4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sampled_windows_never_overlap(tokenizer) -> None:
    # Every position in the stream holds a distinct id except the single EOS, so overlapping windows
    # would repeat an id; aligned windows are consecutive runs that start at a multiple of seq_len.
    texts = [words(0, 200), words(200, NUM_WORDS)]
    stream = [word_id(i) for i in range(200)] + [EOS] + [word_id(i) for i in range(200, NUM_WORDS)]
    seq_len = 13
    windows = sample_token_windows(texts, tokenizer, num_samples=30, seq_len=seq_len, seed=11)
    flat = windows.flatten().tolist()
    assert len(set(flat)) == len(flat)
    for row in windows.tolist():
        start = stream.index(row[0])
        assert start % seq_len == 0 and stream[start : start + seq_len] == row


def test_too_few_tokens_names_counts_and_fix(tokenizer) -> None:
    with pytest.raises(
        CalibrationDataError,
        match=r"gives 10 tokens \(2 windows of calibration\.seq_len=4\).*num_samples=3.*needs 12 tokens.*"
        r"fewer samples, a shorter seq_len, or more text",
    ):
        sample_token_windows([words(0, 10)], tokenizer, num_samples=3, seq_len=4, seed=0)


def test_tokenizer_without_eos_is_refused_for_several_documents(tokenizer) -> None:
    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    no_eos = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(CalibrationDataError, match=r"no eos_token_id, needed to separate 2 documents"):
        sample_token_windows(["a a", "a a"], no_eos, num_samples=1, seq_len=2, seed=0)


def test_trained_byte_level_bpe_windows_come_from_its_own_encoding() -> None:
    corpus = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 5
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    texts = corpus[:4]
    stream = []
    for i, text in enumerate(texts):
        stream += ([bpe.eos_token_id] if i else []) + bpe.encode(text, add_special_tokens=False)
    seq_len = 5
    aligned = {tuple(stream[k : k + seq_len]) for k in range(0, len(stream) - seq_len + 1, seq_len)}
    windows = sample_token_windows(texts, bpe, num_samples=len(stream) // seq_len, seq_len=seq_len, seed=0)
    assert {tuple(row) for row in windows.tolist()} == aligned


# ------------------------------------------------------------------------------- pre-tokenized rows


def test_rows_are_chosen_by_seed_and_truncated() -> None:
    rows = [list(range(100 * r, 100 * r + 5 + r)) for r in range(6)]  # row r: 5 + r tokens
    windows = windows_from_token_rows(rows, num_samples=3, seq_len=4, seed=5)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(5))[:3].tolist()
    assert windows.dtype == torch.int64
    assert windows.tolist() == [[100 * r, 100 * r + 1, 100 * r + 2, 100 * r + 3] for r in order]
    assert torch.equal(windows, windows_from_token_rows(rows, num_samples=3, seq_len=4, seed=5))


def test_short_row_error_names_row_length_and_seq_len() -> None:
    rows = [[1, 2, 3, 4], [5, 6]]
    with pytest.raises(CalibrationDataError, match=r"row 1 has 2 tokens, fewer than calibration\.seq_len=3"):
        windows_from_token_rows(rows, num_samples=2, seq_len=3, seed=0)


def test_fewer_rows_than_samples_is_refused() -> None:
    with pytest.raises(CalibrationDataError, match=r"has 2 rows but calibration\.num_samples=3"):
        windows_from_token_rows([[1, 2], [3, 4]], num_samples=3, seq_len=2, seed=0)


# ------------------------------------------------------------------------------------- dispatching


def test_load_calibration_dispatches_text_and_token_sources(tmp_path: Path, tokenizer) -> None:
    text_source = tmp_path / "c.txt"
    text_source.write_text(f"{words(0, 20)}\n\n{words(20, 39)}\n")
    from_text = load_calibration(text_source, tokenizer, num_samples=4, seq_len=10, seed=1)
    assert torch.equal(
        from_text, sample_token_windows([words(0, 20), words(20, 39)], tokenizer, num_samples=4, seq_len=10, seed=1)
    )
    token_source = tmp_path / "t.parquet"
    rows = [[7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18]]
    pq.write_table(pa.table({"input_ids": rows}), token_source)
    from_rows = load_calibration(token_source, tokenizer, num_samples=3, seq_len=3, seed=2)
    assert torch.equal(from_rows, windows_from_token_rows(rows, num_samples=3, seq_len=3, seed=2))
    assert sorted(from_rows.tolist()) == [[7, 8, 9], [11, 12, 13], [15, 16, 17]]


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"num_samples": 0}, "calibration.num_samples"),
        ({"num_samples": True}, "calibration.num_samples"),
        ({"seq_len": 1}, "calibration.seq_len"),
        ({"seq_len": 8.0}, "calibration.seq_len"),
        ({"seed": -1}, "calibration.seed"),
    ],
)
def test_arguments_are_validated_by_key(tokenizer, kwargs: dict, key: str) -> None:
    args = {"num_samples": 1, "seq_len": 2, "seed": 0} | kwargs
    (value,) = kwargs.values()
    with pytest.raises(CalibrationDataError, match=rf"{key} must be an integer >= \d+; got {value!r}"):
        sample_token_windows([words(0, 10)], tokenizer, **args)


# -------------------------------------------------------------------------------------- parquet file


def test_save_and_load_round_trip_is_exact(tmp_path: Path) -> None:
    ids = torch.randint(0, 150_000, (6, 17), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "calibration.parquet"
    save_calibration(path, ids)
    assert [p.name for p in tmp_path.iterdir()] == ["calibration.parquet"]  # no temporary left behind
    table = pq.read_table(path)
    assert table.column_names == ["input_ids"]
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.column("input_ids").to_pylist() == ids.tolist()  # one row per sample, in order
    loaded = load_calibration_parquet(path)
    assert loaded.dtype == torch.int64 and torch.equal(loaded, ids)


def test_ids_beyond_int32_round_trip_as_int64(tmp_path: Path) -> None:
    ids = torch.tensor([[2**31, 1], [3, 2**40]], dtype=torch.int64)
    path = tmp_path / "calibration.parquet"
    save_calibration(path, ids)
    assert pq.read_schema(path).field("input_ids").type == pa.list_(pa.int64())
    assert torch.equal(load_calibration_parquet(path), ids)


def test_save_refuses_non_matrix(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match=r"shape \(4,\)"):
        save_calibration(tmp_path / "c.parquet", torch.arange(4))
    with pytest.raises(CalibrationDataError, match=r"dtype torch.float32"):
        save_calibration(tmp_path / "c.parquet", torch.zeros(2, 2))


def test_load_refuses_ragged_rows(tmp_path: Path) -> None:
    path = tmp_path / "calibration.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [4, 5, 6], [7, 8]]}), path)
    with pytest.raises(CalibrationDataError, match=r"row 2 has 2 tokens but row 0 has 3"):
        load_calibration_parquet(path)


# -------------------------------------------------------------------------------- contiguous windows


def test_contiguous_windows_cut_in_order_and_drop_the_tail() -> None:
    assert contiguous_windows(list(range(11)), seq_len=3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert contiguous_windows(torch.arange(11, dtype=torch.int32), seq_len=3).tolist()[:2] == [[0, 1, 2], [3, 4, 5]]
    exact = contiguous_windows(torch.arange(12), seq_len=4)
    assert exact.dtype == torch.int64 and exact.shape == (3, 4)
    assert perplexity_windows(range(12), seq_len=4, max_windows=10).shape == (3, 4)  # a cap above the count: all


def test_contiguous_windows_errors() -> None:
    with pytest.raises(CalibrationDataError, match=r"has 3 tokens, fewer than seq_len=4"):
        contiguous_windows([1, 2, 3], seq_len=4)
    with pytest.raises(CalibrationDataError, match=r"shape \(1, 8\)"):
        contiguous_windows(torch.zeros(1, 8, dtype=torch.int64), seq_len=4)
    with pytest.raises(CalibrationDataError, match=r"max_windows must be an integer >= 1; got 0"):
        perplexity_windows(range(8), seq_len=4, max_windows=0)
