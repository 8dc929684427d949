"""Calibration data: any text source -> seeded token windows, and the perplexity-eval cut.

Sources (``calibration.source``):

- ``.txt``: one document per block of lines separated by one or more blank lines (a line holding
  only whitespace counts as blank). Simple and predictable; a single newline stays inside a document.
- ``.jsonl``: one JSON object per line, its ``"text"`` field is the document (blank lines skipped).
- ``.parquet``: a ``text`` column (documents) or an ``input_ids`` column (pre-tokenized rows).
- a folder written by ``datasets.Dataset.save_to_disk`` (``state.json`` / ``dataset_info.json`` and
  ``*.arrow`` files in Arrow IPC stream format), with a ``text`` or ``input_ids`` column. It is read
  with ``pyarrow.ipc`` directly, so ``datasets`` is not needed.

Empty and whitespace-only documents (WikiText has many) are dropped: they carry no tokens and would
only add document separators.

Text is tokenized without special tokens and the documents are joined into one stream with
``tokenizer.eos_token_id`` between consecutive documents (not before the first, not after the last),
so a window that crosses a document boundary sees the same separator the model saw in pretraining.
The stream is cut into non-overlapping ``seq_len`` windows and ``num_samples`` of them are drawn by a
seeded ``torch.randperm``: samples never overlap, and the same seed gives the same samples on every
machine. The result is saved as ``calibration.parquet`` (column ``input_ids``, one row per sample,
in the order used) so a rerun and every stage see the same batches.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

TEXT_COLUMN = "text"
TOKEN_COLUMN = "input_ids"
ACCEPTED_SOURCES = (
    ".txt (documents separated by blank lines), .jsonl (field 'text' per line), "
    ".parquet or a `datasets` save_to_disk folder (column 'text' or pre-tokenized 'input_ids')"
)
_INT32_MAX = 2**31 - 1


class CalibrationDataError(ValueError):
    """The calibration source or arguments cannot give the requested windows."""


# ----------------------------------------------------------------------------------------- readers


def read_texts(source: Path) -> list[str]:
    """Documents of a text source, in file order; empty documents dropped (see module docstring)."""
    source = _existing(source)
    if source.is_dir():
        texts = _text_column(source, _read_dataset_folder(source))
    elif source.suffix == ".txt":
        texts = _read_txt(source)
    elif source.suffix == ".jsonl":
        texts = _read_jsonl(source)
    elif source.suffix == ".parquet":
        texts = _text_column(source, _read_parquet(source, TEXT_COLUMN))
    else:
        raise CalibrationDataError(
            f"calibration.source {str(source)!r} has suffix {source.suffix!r}, which is not a known "
            f"format; accepted: {ACCEPTED_SOURCES}."
        )
    documents = [t for t in texts if t.strip()]
    if not documents:
        raise CalibrationDataError(
            f"calibration.source {str(source)!r} holds no text: found {len(texts)} document(s), all "
            f"empty or whitespace-only. Point it at a file with text; accepted: {ACCEPTED_SOURCES}."
        )
    return documents


def read_token_rows(source: Path) -> list[list[int]] | None:
    """Rows of a pre-tokenized ``input_ids`` column; None when the source holds text instead."""
    source = _existing(source)
    if source.is_dir():
        table = _read_dataset_folder(source)
    elif source.suffix == ".parquet":
        table = _read_parquet(source, TOKEN_COLUMN)
    else:
        return None
    if TOKEN_COLUMN not in table.column_names:
        return None
    column = table.column(TOKEN_COLUMN)
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not pa.types.is_integer(
        column.type.value_type
    ):
        raise CalibrationDataError(
            f"calibration.source {str(source)!r}: column 'input_ids' has type {column.type}; "
            "expected a list of integers per row (list<int32> or list<int64>)."
        )
    rows = column.to_pylist()
    for index, row in enumerate(rows):
        if row is None or any(token is None for token in row):
            raise CalibrationDataError(
                f"calibration.source {str(source)!r}: input_ids row {index} is null or holds null "
                "tokens; drop or fix that row."
            )
    if not rows:
        raise CalibrationDataError(
            f"calibration.source {str(source)!r} has an 'input_ids' column with 0 rows; "
            "it needs at least calibration.num_samples rows."
        )
    return rows


def read_records(source: Path) -> list[str] | list[list[int]]:
    """Pre-tokenized rows when the source has ``input_ids``, else its text documents."""
    rows = read_token_rows(source)
    return rows if rows is not None else read_texts(source)


def _existing(source: Path) -> Path:
    source = Path(source)
    if not source.exists():
        raise CalibrationDataError(
            f"calibration.source {str(source)!r} does not exist; accepted: {ACCEPTED_SOURCES}."
        )
    return source


def _read_txt(source: Path) -> list[str]:
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"calibration.source {str(source)!r} is not UTF-8 text (byte {e.start}: "
                                   f"{e.reason}); give a UTF-8 text file") from None
    return [block.strip() for block in re.split(r"\n\s*\n", text)]


def _read_jsonl(source: Path) -> list[str]:
    try:
        return _read_jsonl_utf8(source)
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"calibration.source {str(source)!r} is not UTF-8 text (byte {e.start}: "
                                   f"{e.reason}); give a UTF-8 .jsonl file") from None


def _read_jsonl_utf8(source: Path) -> list[str]:
    texts = []
    with source.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationDataError(
                    f"calibration.source {str(source)!r} line {line_number} is not valid JSON ({err.msg}); "
                    "each line must be one JSON object with a string field 'text'."
                ) from err
            if not isinstance(record, dict) or not isinstance(record.get(TEXT_COLUMN), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CalibrationDataError(
                    f"calibration.source {str(source)!r} line {line_number} has no string field 'text' "
                    f"(found {found}); each line must be one JSON object with a string field 'text'."
                )
            texts.append(record[TEXT_COLUMN])
    return texts


def _read_parquet(source: Path, column: str) -> pa.Table:
    """Only the column asked for (parquet files may carry many wide columns); when it is missing,
    an empty table with the file's schema, so the caller can name the columns found."""
    schema = pq.read_schema(source)
    if column not in schema.names:
        return schema.empty_table()
    return pq.read_table(source, columns=[column])


def _read_dataset_folder(source: Path) -> pa.Table:
    """A ``datasets`` ``save_to_disk`` folder: its ``.arrow`` shards in the order ``state.json`` lists."""
    if (source / "dataset_dict.json").exists():
        splits = sorted(p.name for p in source.iterdir() if p.is_dir())
        raise CalibrationDataError(
            f"calibration.source {str(source)!r} is a DatasetDict with splits {splits}; point it at "
            f"one split folder, e.g. {str(source / (splits[0] if splits else 'train'))!r}."
        )
    state = source / "state.json"
    listed = json.loads(state.read_text()).get("_data_files") if state.exists() else None
    if listed:
        files = [source / entry["filename"] for entry in listed]
    else:
        files = sorted(source.glob("*.arrow"))
    if not files or not ((source / "dataset_info.json").exists() or state.exists()):
        found = sorted(p.name for p in source.iterdir())[:10]
        raise CalibrationDataError(
            f"calibration.source {str(source)!r} is a folder but not a `datasets` save_to_disk folder "
            f"(found {found}); expected state.json or dataset_info.json plus *.arrow files. "
            f"Accepted: {ACCEPTED_SOURCES}."
        )
    return pa.concat_tables([_read_arrow(path) for path in files])


def _read_arrow(path: Path) -> pa.Table:
    """``datasets`` writes the IPC stream format; the file format is accepted as well."""
    with pa.memory_map(str(path)) as mapped:
        try:
            return pa.ipc.open_stream(mapped).read_all()
        except pa.ArrowInvalid:
            mapped.seek(0)
            return pa.ipc.open_file(mapped).read_all()


def _text_column(source: Path, table: pa.Table) -> list[str]:
    if TEXT_COLUMN not in table.column_names:
        hint = (
            " It holds pre-tokenized 'input_ids': load it with load_calibration / read_token_rows."
            if TOKEN_COLUMN in table.column_names
            else ""
        )
        raise CalibrationDataError(
            f"calibration.source {str(source)!r} has no 'text' column; found columns "
            f"{table.column_names}. Accepted columns: 'text' (documents) or 'input_ids' "
            f"(pre-tokenized rows).{hint}"
        )
    column = table.column(TEXT_COLUMN)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise CalibrationDataError(
            f"calibration.source {str(source)!r}: column 'text' has type {column.type}; expected strings."
        )
    return [text for text in column.to_pylist() if text is not None]


# ----------------------------------------------------------------------------------------- windows


def sample_token_windows(
    texts: Sequence[str], tokenizer, num_samples: int, seq_len: int, seed: int
) -> Tensor:  # int64 [num_samples, seq_len]
    """Seeded, non-overlapping ``seq_len`` windows from the EOS-joined token stream of ``texts``."""
    _check_sampling_args(num_samples, seq_len, seed)
    stream = _token_stream(texts, tokenizer)
    num_windows = len(stream) // seq_len
    if num_windows < num_samples:
        raise CalibrationDataError(
            f"calibration text gives {len(stream)} tokens ({num_windows} windows of "
            f"calibration.seq_len={seq_len}), but calibration.num_samples={num_samples} x "
            f"calibration.seq_len={seq_len} needs {num_samples * seq_len} tokens. Use fewer samples, a "
            "shorter seq_len, or more text."
        )
    windows = torch.tensor(stream[: num_windows * seq_len], dtype=torch.int64).view(num_windows, seq_len)
    return windows[_permutation(num_windows, seed)[:num_samples]].contiguous()


def windows_from_token_rows(
    rows: Sequence[Sequence[int]], num_samples: int, seq_len: int, seed: int
) -> Tensor:  # int64 [num_samples, seq_len]
    """``num_samples`` pre-tokenized rows chosen by seeded permutation, each cut to its first ``seq_len``."""
    _check_sampling_args(num_samples, seq_len, seed)
    if len(rows) < num_samples:
        raise CalibrationDataError(
            f"the pre-tokenized source has {len(rows)} rows but calibration.num_samples={num_samples}; "
            "use fewer samples or a source with more rows."
        )
    chosen = _permutation(len(rows), seed)[:num_samples].tolist()
    for index in chosen:
        if len(rows[index]) < seq_len:
            raise CalibrationDataError(
                f"pre-tokenized row {index} has {len(rows[index])} tokens, fewer than "
                f"calibration.seq_len={seq_len}; use a shorter seq_len or drop rows shorter than it."
            )
    return torch.tensor([list(rows[index][:seq_len]) for index in chosen], dtype=torch.int64)


def load_calibration(
    source: Path, tokenizer, num_samples: int, seq_len: int, seed: int
) -> Tensor:  # int64 [num_samples, seq_len]
    """Any accepted source -> calibration windows (pre-tokenized rows used as they are)."""
    _check_sampling_args(num_samples, seq_len, seed)
    rows = read_token_rows(source)
    if rows is not None:
        logger.info("calibration: %d pre-tokenized rows from %s", len(rows), source)
        return windows_from_token_rows(rows, num_samples, seq_len, seed)
    texts = read_texts(source)
    logger.info("calibration: %d documents from %s", len(texts), source)
    return sample_token_windows(texts, tokenizer, num_samples, seq_len, seed)


def contiguous_windows(
    token_ids: Sequence[int] | Tensor,  # [num_tokens]
    seq_len: int,
) -> Tensor:  # int64 [num_windows, seq_len]
    """Consecutive windows from the start of the stream (WikiText style); the tail that does not fill a
    whole window is dropped, so every window is scored on the same context length."""
    _check_int("seq_len", seq_len, minimum=2)
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    if ids.dim() != 1:
        raise CalibrationDataError(
            f"token_ids must be one flat token stream of shape [num_tokens]; got shape {tuple(ids.shape)}. "
            "Flatten it (ids.view(-1)) or cut each row separately."
        )
    num_windows = ids.numel() // seq_len
    if num_windows == 0:
        raise CalibrationDataError(
            f"the token stream has {ids.numel()} tokens, fewer than seq_len={seq_len}: no full window. "
            "Use a shorter seq_len or more text."
        )
    return ids[: num_windows * seq_len].reshape(num_windows, seq_len).clone()


def perplexity_windows(token_ids: Sequence[int], seq_len: int, max_windows: int | None = None,
                       bos_id: int | None = None) -> Tensor:  # int64 [num_windows, seq_len]
    """The perplexity-eval cut every command uses: consecutive windows of the token stream; with
    ``bos_id`` each is BOS + seq_len - 1 text tokens.

    ``max_windows`` keeps that many windows spread evenly over the whole text (first and last
    included), so a subsample covers every part of it rather than the first articles only.
    """
    if max_windows is not None:
        _check_int("max_windows", max_windows, minimum=1)
    body = contiguous_windows(token_ids, seq_len - (bos_id is not None))
    if max_windows is not None and max_windows < len(body):
        body = body[torch.linspace(0, len(body) - 1, max_windows).round().long()]
    if bos_id is None:
        return body
    return torch.cat([torch.full((len(body), 1), bos_id, dtype=torch.int64), body], dim=1)


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text input (held-out or perplexity text); ``what`` names the setting in the error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"{what}: {path} is not UTF-8 text (byte {e.start}: {e.reason}); give a "
                                   "plain-text file") from None


def _token_stream(texts: Sequence[str], tokenizer) -> list[int]:
    if not texts:
        raise CalibrationDataError("calibration text is empty: no documents to tokenize.")
    eos = tokenizer.eos_token_id
    if eos is None and len(texts) > 1:
        raise CalibrationDataError(
            f"the tokenizer has no eos_token_id, needed to separate {len(texts)} documents; "
            "set tokenizer.eos_token or use a tokenizer that defines one."
        )
    encoded = tokenizer(
        list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    stream: list[int] = list(encoded[0])
    for ids in encoded[1:]:
        stream.append(eos)
        stream.extend(ids)
    return stream


def _permutation(n: int, seed: int) -> Tensor:  # int64 [n]
    """Same seed -> same order on every machine (CPU generator, independent of the global RNG)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=generator)


def _check_sampling_args(num_samples: int, seq_len: int, seed: int) -> None:
    _check_int("calibration.num_samples", num_samples, minimum=1)
    _check_int("calibration.seq_len", seq_len, minimum=2)
    _check_int("calibration.seed", seed, minimum=0)


def _check_int(key: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CalibrationDataError(f"{key} must be an integer >= {minimum}; got {value!r}.")


# ------------------------------------------------------------------------------------------- files


def save_calibration(path: Path, input_ids: Tensor) -> None:  # input_ids: [num_samples, seq_len]
    """Write ``calibration.parquet`` (column ``input_ids``, one row per sample) atomically.

    Written to a temporary name in the same folder, fsynced, then renamed: a crash never leaves a
    half-written file that a resumed run would take as complete. Ids are stored as int32 when they
    fit (every real vocabulary does), else int64; reading back gives int64 either way.
    """
    path = Path(path)
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise CalibrationDataError(
            f"input_ids must be an integer tensor [num_samples, seq_len]; got dtype {input_ids.dtype} "
            f"and shape {tuple(input_ids.shape)}."
        )
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    num_samples, seq_len = ids.shape
    fits_int32 = ids.numel() == 0 or (int(ids.min()) >= -_INT32_MAX - 1 and int(ids.max()) <= _INT32_MAX)
    values = pa.array(ids.view(-1).numpy(), type=pa.int32() if fits_int32 else pa.int64())
    offsets = pa.array([row * seq_len for row in range(num_samples + 1)], type=pa.int32())
    table = pa.table({TOKEN_COLUMN: pa.ListArray.from_arrays(offsets, values)})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_calibration_parquet(path: Path) -> Tensor:  # int64 [num_samples, seq_len]
    """Read back ``save_calibration``'s file exactly; every row must have the same length."""
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"calibration file {str(path)!r} does not exist; run the calibrate stage.")
    names = pq.ParquetFile(path).schema_arrow.names
    if TOKEN_COLUMN not in names:
        raise CalibrationDataError(
            f"calibration file {str(path)!r} has no 'input_ids' column; found columns {names}."
        )
    column = pq.read_table(path, columns=[TOKEN_COLUMN]).column(TOKEN_COLUMN).combine_chunks()
    if len(column) == 0:
        raise CalibrationDataError(f"calibration file {str(path)!r} has 0 rows; rerun the calibrate stage.")
    if column.null_count:
        raise CalibrationDataError(f"calibration file {str(path)!r} has {column.null_count} null rows.")
    lengths = pc.list_value_length(column).to_numpy()
    bad = (lengths != lengths[0]).nonzero()[0]
    if bad.size:
        raise CalibrationDataError(
            f"calibration file {str(path)!r}: row {int(bad[0])} has {int(lengths[bad[0]])} tokens but row 0 "
            f"has {int(lengths[0])}; every row must have the same seq_len. Rerun the calibrate stage."
        )
    values = column.flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(values.astype("int64")).view(len(column), int(lengths[0]))
