"""The one place that opens a model folder for reading: its config, tokenizer, index and shard paths.

What it promises (README, "What the tool promises"):

- no code from the folder ever runs: every transformers load passes ``trust_remote_code=False``, so
  an ``auto_map`` in ``config.json`` or ``tokenizer_config.json`` is never followed (the built-in
  class of the supported ``model_type`` is used; when the tokenizer has none, the load is refused),
  and ``auto_map`` is dropped, with a warning, from the copies written into an output folder;
- nothing outside the folder is read: every file name the folder's own JSON gives (shard names in
  the index) and every side file copied to an output is resolved, symlinks included, and must stay
  inside the folder;
- every JSON file is checked before use: UTF-8, valid JSON, the right shape, with errors naming the
  file, the line and the key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Keys that point transformers at Python files in the folder. Never followed; dropped from outputs.
REMOTE_CODE_KEYS = ("auto_map",)
# Tokenizer and generation files: read by the tokenizer load, copied unchanged (but for auto_map) into outputs.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
              "chat_template.json")


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or not something we can read; says which file and why."""


def inside(root: Path, name: str, source: str) -> Path:
    """``root / name`` when it stays inside ``root`` once resolved (symlinks included); ``source``
    names where ``name`` came from (a file and key) for the error."""
    root = Path(root)
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{source}: {name!r} is not a file name")
    if Path(name).is_absolute():
        raise CheckpointError(f"{source}: {name!r} is an absolute path; entries must name files inside the model "
                              f"folder {root}. Fix the entry (or re-download the model).")
    path = root / name
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        raise CheckpointError(f"{source}: {name!r} resolves to {real}, outside the model folder {root}; slm-dist "
                              "reads nothing outside it. Fix the entry or copy the file into the folder.")
    return path


def read_json(path: Path, what: str = "") -> Any:
    """A JSON file decoded strictly (UTF-8), with errors naming the file and line."""
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{label} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{label} is a folder, not a JSON file") from None
    except OSError as e:
        raise CheckpointError(f"{label} cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{label} is not UTF-8 text (byte {e.start}): a corrupt or binary file; "
                              "re-download or re-copy it") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{label} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                              "re-download or fix it") from None


def read_json_object(path: Path, what: str = "") -> dict:
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a {type(data).__name__}; re-download or fix it")
    return data


def read_config(root: Path) -> dict:
    """``config.json``: an object with a positive ``num_hidden_layers`` and a ``model_type``; any
    ``auto_map`` is dropped (with a warning) so nothing downstream, outputs included, carries it."""
    root = Path(root)
    path = root / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{root} has no {CONFIG_NAME}: point model.path at a Hugging Face model folder")
    config = read_json_object(inside(root, CONFIG_NAME, f"{root}"))
    layers = config.get("num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise CheckpointError(f"{path}: num_hidden_layers is {layers!r}; it must be a positive integer (the number "
                              "of decoder layers). Fix the config or re-download the model.")
    if not isinstance(config.get("model_type"), str):
        raise CheckpointError(f"{path}: model_type is {config.get('model_type')!r}; it must name the architecture "
                              "(e.g. \"llama\")")
    return without_remote_code(config, path)


def without_remote_code(data: dict, path: Path) -> dict:
    found = [k for k in REMOTE_CODE_KEYS if k in data]
    if not found:
        return data
    log.warning("%s has %s naming custom Python code: ignored (slm-dist never runs code from a model folder; the "
                "built-in class of the model type is used) and left out of every file slm-dist writes", path,
                ", ".join(found))
    return {k: v for k, v in data.items() if k not in REMOTE_CODE_KEYS}


def tokenizer_config(root: Path) -> dict | None:
    """``tokenizer_config.json`` checked (or None when the folder has none)."""
    root = Path(root)
    if not (root / TOKENIZER_CONFIG).exists():
        return None
    return read_json_object(inside(root, TOKENIZER_CONFIG, f"{root}"))


def load_tokenizer(root: Path):
    """The folder's tokenizer through transformers' built-in classes only (never the folder's code)."""
    from transformers import AutoTokenizer

    root = Path(root)
    for name in SIDE_FILES:  # transformers reads these by name: none may lead outside the folder
        side_file(root, name)
    tok_config = tokenizer_config(root)
    if tok_config is not None:
        without_remote_code(tok_config, root / TOKENIZER_CONFIG)  # the warning, once per load
    try:
        return AutoTokenizer.from_pretrained(str(root), trust_remote_code=False)
    except ValueError as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            cls = (tok_config or {}).get("tokenizer_class")
            raise CheckpointError(f"{root / TOKENIZER_CONFIG}: tokenizer_class {cls!r} exists only as custom code in "
                                  "the folder (auto_map), which slm-dist never runs. Set tokenizer_class to a "
                                  "transformers class (e.g. PreTrainedTokenizerFast) if the tokenizer.json is "
                                  "standard.") from None
        raise


def hf_config(config: dict, attn_implementation: str | None = None):
    """A transformers config object built from an already checked ``config.json`` dict (no file is
    read, so no ``auto_map`` can be followed)."""
    from transformers import CONFIG_MAPPING

    values = {k: v for k, v in config.items() if k not in REMOTE_CODE_KEYS}
    out = CONFIG_MAPPING[config["model_type"]].from_dict(values)  # what from_pretrained does after reading
    if attn_implementation is not None:
        out._attn_implementation = attn_implementation
    return out


def load_causal_lm(root: Path, **kwargs):
    """A whole model folder as a transformers model, safetensors only, no remote code (healing; checks)."""
    from transformers import AutoModelForCausalLM

    read_config(root)
    return AutoModelForCausalLM.from_pretrained(str(root), trust_remote_code=False, use_safetensors=True, **kwargs)


def side_file(root: Path, name: str) -> Path | None:
    """A tokenizer or generation file to copy into an output: None when absent; an error when it is a
    link leading outside the folder."""
    root = Path(root)
    path = root / name
    if not path.is_file():
        return None
    return inside(root, name, f"{root} side file")


def side_file_bytes(root: Path, name: str) -> bytes | None:
    """What an output gets for a side file: its bytes, with ``auto_map`` removed from a tokenizer config."""
    path = side_file(root, name)
    if path is None:
        return None
    if name == TOKENIZER_CONFIG:
        data = read_json_object(path)
        if any(k in data for k in REMOTE_CODE_KEYS):
            return (json.dumps(without_remote_code(data, path), indent=2, ensure_ascii=False) + "\n").encode()
    return path.read_bytes()
