"""The Hugging Face Hub at the edges of a run: a model named by repo id is fetched into the Hub cache
(only the files a merge reads), and a finished output folder is uploaded without our bookkeeping.

`huggingface_hub` is imported inside the functions: `verify` and the dry run never pay for it.
It reads its own environment (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ``HF_TOKEN``); nothing here
reads any other.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from slm_dist.checkpoint.index import CheckpointError
from slm_dist.checkpoint.lock import LOCK_NAME
from slm_dist.checkpoint.verify import verify_model

log = logging.getLogger(__name__)

# What a merge, a tokenizer and a redistribution need from a Hub repo; never pickles (*.bin) or
# code (*.py), which slm-dist would not run anyway.
FETCH_PATTERNS = (
    "*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "README.md",
    "LICENSE*", "LICENCE*", "License*", "license*", "COPYING*", "NOTICE*", "USE_POLICY*",
)
# Written by slm-dist beside the model, never part of it: the folder lock, the output marker, the
# temporary names of files being written (the marker's name is `export.OUTPUT_MARKER`; it is
# spelled here because export imports this module).
UPLOAD_IGNORE = (LOCK_NAME, ".slm-dist-output", ".*.partial", "*.partial", ".cache/**", "__pycache__/**")
# models--{org}--{name}/snapshots/{revision}: where huggingface_hub puts a snapshot.
_CACHE_SNAPSHOT = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")


def looks_like_repo_id(value: str) -> bool:
    """``org/name`` as the Hub spells repo ids (a bare name is taken for a missing folder instead)."""
    if value.count("/") != 1 or value.startswith((".", "/", "~")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def resolve_model(path: str | Path, weights: bool = True) -> Path:
    """The local folder of ``path``: an existing folder as it is, a Hub repo id as its cached snapshot
    (downloaded first unless ``HF_HUB_OFFLINE=1``, in which case the cache must hold it). Without
    ``weights`` only the small files are fetched (the dry run reads config.json and the index)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    text = str(path)
    if folder.exists():
        raise CheckpointError(f"model.path {text} is a file, not a model folder; give the folder holding "
                              "config.json and the safetensors weights, or a Hub repo id like org/name")
    if not looks_like_repo_id(text):
        raise CheckpointError(f"model.path {text!r} is neither an existing folder nor a Hub repo id (org/name); "
                              "give a local model folder or a repo id like HuggingFaceTB/SmolLM2-135M")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    log.info("model.path %s is a Hub repo id: fetching its %sconfig, tokenizer and licence files", text,
             "safetensors, " if weights else "")
    try:
        patterns = [p for p in FETCH_PATTERNS if weights or p != "*.safetensors"]
        local = snapshot_download(text, allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"model.path {text}: the Hub cannot be reached and the local Hub cache holds no "
                              f"snapshot of it ({e}); connect (unset HF_HUB_OFFLINE), or download it first with "
                              f"`hf download {text}`, or give a local folder") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"model.path {text}: no such Hub repo, or it is gated/private and no token is set "
                              "(HF_TOKEN or `hf auth login`); check the id") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"model.path {text}: the Hub refused the download ({e}); check the id and your "
                              "access to it") from None
    return Path(local)


def repo_id_of(folder: Path) -> str | None:
    """The Hub repo id of a folder that is a snapshot in the Hub cache (``.../models--org--name/snapshots/REV``)."""
    folder = Path(folder)
    if folder.parent.name != "snapshots":
        return None
    match = _CACHE_SNAPSHOT.match(folder.parent.parent.name)
    return f"{match['org']}/{match['name']}" if match else None


def push_folder(folder: Path, repo_id: str, *, private: bool | None = None, api: Any = None) -> str:
    """Upload a finished, verified model folder to the Hub model repo ``repo_id`` (created when missing),
    leaving out the lock, the output marker and temporary files; returns the repo's URL.

    A folder that fails `verify_model` is refused before anything is sent.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; give a model folder or a run folder")
    if not looks_like_repo_id(repo_id):
        raise CheckpointError(f"{repo_id!r} is not a Hub repo id; give one like your-name/SmolLM2-135M-pruned")
    problems = verify_model(folder)
    if problems:
        raise CheckpointError(f"{folder} is not a complete, verified checkpoint, so it is not uploaded: "
                              f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                              + "; finish it with `slm-dist merge` or `slm-dist run` first")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    log.info("uploading %s to %s", folder, repo_id)
    if hasattr(api, "upload_large_folder"):  # resumable, multi-commit: what a 140 GB checkpoint needs
        api.upload_large_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                ignore_patterns=list(UPLOAD_IGNORE))
    else:  # huggingface_hub versions without it
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          ignore_patterns=list(UPLOAD_IGNORE),
                          commit_message="Upload depth-pruned model (slm-dist)")
    return str(url)
