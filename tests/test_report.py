"""``persona report`` and ``persona.report`` (issue 14): one self-contained HTML file per store, a section
per adapter with its timeline, loss matrix and lineage, plots as inline SVG, user text escaped, nothing
fetched from anywhere, and no torch without the matrix."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from persona import Store
from persona.cli import main
from persona.errors import BaseModelUnavailable
from persona.report import build_report, plots, render_report, render_report_body

ROOT = Path(__file__).resolve().parents[1]
# a figure whose labels pushed its axes to nothing is a broken plot, not a warning
pytestmark = pytest.mark.filterwarnings("error:constrained_layout not applied:UserWarning")
MAX_LENGTH = 96
# attributes that make a browser fetch (or navigate to) what they name
URL_ATTRIBUTES = {"src", "href", "xlink:href", "action", "formaction", "poster", "data", "srcset", "background",
                  "cite", "longdesc", "manifest", "ping"}
CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")]*)", re.IGNORECASE)


class Page(HTMLParser):
    """What the tests look at in a report: sections, their text and SVGs, every URL-bearing attribute."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, dict] = {}
        self.current: str | None = None
        self.depth = 0
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.fragments: list[str] = []
        self.text: list[str] = []
        self.styles: list[str] = []
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        for name, value in attrs.items():
            if name in URL_ATTRIBUTES and value is not None:
                self.urls.append(value)
                if value.startswith("#"):
                    self.fragments.append(value[1:])
            if name == "style" and value:
                self.styles.append(value)
            if name == "id":
                self.ids.append(value)
        self._in_style = tag == "style"
        if tag == "section" and "data-adapter" in attrs:
            self.current, self.depth = attrs["data-adapter"], 0
            self.sections[self.current] = {"svg": 0, "text": []}
        if self.current is not None and tag == "section":
            self.depth += 1
        if self.current is not None and tag == "svg":
            self.sections[self.current]["svg"] += 1

    def handle_endtag(self, tag):
        self._in_style = False
        if self.current is not None and tag == "section":
            self.depth -= 1
            if self.depth == 0:
                self.current = None

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)
            return
        self.text.append(data)
        if self.current is not None:
            self.sections[self.current]["text"].append(data)

    def section_text(self, adapter: str) -> str:
        return " ".join(self.sections[adapter]["text"])


def external_urls(page: Page) -> list[str]:
    """Every URL in the document that points off the file: an attribute or a CSS url() not a fragment (#id)
    or inline data."""
    urls = page.urls + [m for style in page.styles for m in CSS_URL.findall(style)]
    return [u for u in urls if not u.startswith(("#", "data:"))]


def heavy_modules_after(code: str) -> str:
    """Run ``code`` (ending in a print of the heavy modules it imported) in a fresh interpreter: what it printed."""
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def write_report(root: Path, *args: str) -> tuple[object, dict | None]:
    result = CliRunner().invoke(main, ["report", "--store", str(root), "--max-length", str(MAX_LENGTH), *args])
    data = json.loads(result.stdout) if result.exit_code == 0 and "--json" in args else None
    return result, data


@pytest.fixture(scope="module")
def full_report(report_store):
    """The report with the loss matrix over every adapter of the shared store, built once."""
    report = build_report(Store.open(report_store.root), max_length=MAX_LENGTH)
    return report, render_report(report)


def test_report_has_a_section_per_adapter_with_its_versions_and_an_svg_per_plot(full_report):
    report, text = full_report
    page = Page(text)
    assert text.startswith("<!DOCTYPE html>") and page.tags.count("html") == 1
    assert list(page.sections) == ["user:alice", "user:bob", "domain:finance", "merged:af"]
    alice = page.section_text("user:alice")
    for label in ("v0001", "v0002", "v0003", "v0004"):
        assert label in alice
    assert "refused" in alice and "promoted" in alice and "candidate" in alice
    # alice: timeline, matrix, lineage; bob (layered, one update): the same; finance and the merge: lineage only
    assert {a: s["svg"] for a, s in page.sections.items()} == {"user:alice": 3, "user:bob": 3,
                                                               "domain:finance": 1, "merged:af": 1}
    assert page.tags.count("svg") == 3 + 3 + 1 + 1 + 2  # and gain and forgetting across adapters
    assert "domain:finance@v0001" in page.section_text("user:bob")  # the layer, in the lineage list
    merged = page.section_text("merged:af")
    assert "user:alice@v0003" in merged and "domain:finance@v0001" in merged and "weight 0.7" in merged
    assert "no version up to this one kept a held-out slice" in merged

    alice_report = report.adapters[0]
    assert alice_report.final == "v0003" and alice_report.matrix.final == "v0003"  # as of current, not the candidate
    assert alice_report.matrix.columns == ("v0002", "v0003") and alice_report.matrix.not_kept == ("v0001",)
    assert [p.origin for p in alice_report.timeline] == ["create", "update", "update", "update"]
    assert [p.promoted for p in alice_report.timeline] == [None, True, True, False]
    bob = report.adapters[1]
    assert bob.matrix.columns == ("v0002",)
    assert (bob.lineage[0].source, bob.lineage[0].relation) == ("domain:finance@v0001", "over")


def test_timeline_numbers_are_what_the_trainer_recorded_and_gain_is_the_final_versions_on_its_slices(full_report,
                                                                                                       report_store):
    report, _ = full_report
    alice = report.adapters[0]
    store = Store.open(report_store.root)
    for point in alice.timeline[1:3]:  # the two real updates
        metrics = store.version_info(f"user:alice@v{point.version}").metrics
        assert (point.heldout_before, point.heldout_after) == (metrics["heldout_loss_before"],
                                                               metrics["heldout_loss_after"])
        assert point.rows_trained == metrics["train_examples"] > 0 and point.reason == metrics["gate"]["reason"]
        assert point.heldout_kept
    m = alice.matrix
    expected = sum(m.loss("base", c) - m.loss("v0003", c) for c in m.columns) / len(m.columns)
    assert plots.user_gain(alice, from_matrix=True) == pytest.approx(expected)
    assert plots.user_gain(report.adapters[3], from_matrix=True) is None  # the merge kept no slice
    improvements = [p.heldout_before - p.heldout_after for p in alice.timeline[1:3]]
    assert plots.user_gain(alice, from_matrix=False) == pytest.approx(sum(improvements) / 2)  # promoted ones only
    assert plots.user_forgetting(alice) == [alice.timeline[2].forgetting, 0.5]  # v2 had no replay to measure


def test_a_damaged_version_is_reported_and_the_rest_still_shown(report_store, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(report_store.root, root)
    (root / "user" / "alice" / "v0002" / "meta.json").write_text("{")
    report = build_report(Store.open(root), matrix=False)
    alice = report.adapters[0]
    assert [p.label for p in alice.timeline] == ["v0001", "v0003", "v0004"]
    assert len(alice.damaged) == 1 and "v0002" in alice.damaged[0] and "meta.json" in alice.damaged[0]
    page = Page(render_report(report))
    assert "Damaged" in page.section_text("user:alice") and page.sections["user:alice"]["svg"] == 2


def test_planted_markup_in_a_gate_reason_and_a_lineage_entry_is_escaped(full_report, report_store):
    _, text = full_report
    page = Page(text)
    assert "script" not in page.tags and "img" not in page.tags  # no element came from the planted text
    assert report_store.planted not in text
    assert "&lt;script&gt;alert(&#x27;planted&#x27;)&lt;/script&gt;" in text
    assert report_store.planted in page.section_text("user:alice")  # shown as text, in the timeline table
    assert report_store.planted in page.section_text("user:bob")  # the lineage entry's relation
    gate_table = text[text.index('class="gate-failures"'):]
    assert "user:alice" in gate_table.split("</table>")[0] and "1 of 3" in gate_table.split("</table>")[0]


def test_report_fetches_nothing_and_every_svg_reference_stays_in_its_figure(full_report):
    _, text = full_report
    page = Page(text)
    assert external_urls(page) == []
    assert not {"script", "link", "iframe", "object", "embed", "img", "base"} & set(page.tags)
    assert "@import" not in text and "<?xml" not in text and "<!DOCTYPE svg" not in text
    assert "default-src 'none'" in text  # the document's CSP forbids loading anything
    # several figures share one document: every id is unique and every #reference finds its target
    assert len(page.ids) == len(set(page.ids))
    assert page.fragments and set(page.fragments) <= set(page.ids)


def test_the_external_url_check_sees_attributes_and_css():
    page = Page('<a href="#x">a</a><img src="https://cdn.example/x.png"><div style="background:url(//e.example/y)">'
                '</div><svg><use xlink:href="#g"/><image href="data:image/png;base64,AA"/></svg>'
                '<style>p{background:url("http://e.example/z")}</style>')
    assert external_urls(page) == ["https://cdn.example/x.png", "//e.example/y", "http://e.example/z"]


def test_a_pinned_reference_shows_the_adapter_as_of_that_version(report_store):
    report = build_report(Store.open(report_store.root), ["user:alice@v2"], max_length=MAX_LENGTH)
    (alice,) = report.adapters
    assert [p.label for p in alice.timeline] == ["v0001", "v0002"]
    assert alice.matrix.final == "v0002" and alice.matrix.columns == ("v0002",) and alice.matrix.bwt is None


def test_an_injected_matrix_source_is_asked_only_for_adapters_with_a_kept_slice(report_store):
    asked = []

    def source(ref):
        asked.append(ref.id)
        raise BaseModelUnavailable(f"{ref.id}: no base here")

    report = build_report(Store.open(report_store.root), matrix=source)
    assert asked == ["user:alice", "user:bob"]
    notes = {a.adapter: a.matrix_note for a in report.adapters}
    assert notes["user:alice"] == "the loss matrix could not be computed: user:alice: no base here"
    assert notes["merged:af"].startswith("no version up to this one kept a held-out slice")
    body = render_report_body(report, heading=False)
    assert body.startswith('<div class="persona-report">') and "<h1>" not in body and "<html" not in body


def test_no_matrix_report_reads_meta_only_and_imports_no_torch(report_store):
    code = (f"from persona.store import Store\nfrom persona.report import build_report, render_report\n"
            f"text = render_report(build_report(Store.open({str(report_store.root)!r}), matrix=False))\n"
            "import sys\nassert text.count('<svg') == 8, text.count('<svg')\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    assert heavy_modules_after(code) == "[]"


def test_cli_no_matrix_imports_no_torch(report_store, tmp_path):
    target = tmp_path / "quick.html"
    code = ("import sys\nfrom persona.cli import main\n"
            f"try:\n    main(['report', '--no-matrix', '--store', {str(report_store.root)!r}, '--out', {str(target)!r}])\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    assert heavy_modules_after(code) == "[]" and target.read_text().count("<svg") == 8


def test_cli_report_json_exit_codes_and_nothing_written_on_failure(report_store, tmp_path):
    target = tmp_path / "out" / "report.html"
    target.parent.mkdir()
    result, data = write_report(report_store.root, "user:alice", "merged:af", "--out", str(target), "--json")
    assert result.exit_code == 0, result.output
    assert data == {"path": str(target), "adapters": ["user:alice", "merged:af"], "bytes": target.stat().st_size}
    assert list(Page(target.read_text()).sections) == ["user:alice", "merged:af"]
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]  # no temp file left beside it

    missing = tmp_path / "missing.html"
    result, _ = write_report(report_store.root, "user:alice", "user:nobody", "--out", str(missing), "--no-matrix")
    assert result.exit_code == 1 and "no adapter user:nobody" in result.output and not missing.exists()
    result, _ = write_report(report_store.root, "user:alice@v9", "--out", str(missing), "--no-matrix", "--json")
    assert result.exit_code == 1 and json.loads(result.stderr)["error"]["type"] == "VersionNotFound"
    result, _ = write_report(report_store.root, "user:Alice", "--out", str(missing), "--no-matrix")
    assert result.exit_code == 1 and not missing.exists()

    inside = report_store.root / "report.html"
    result, _ = write_report(report_store.root, "--out", str(inside), "--no-matrix")
    assert result.exit_code == 2 and "inside the adapter store" in result.output and not inside.exists()
    result, _ = write_report(report_store.root, "--no-matrix")
    assert result.exit_code == 2 and "--out" in result.output


def test_reports_render_in_several_threads_at_once(report_store):
    """The server renders for concurrent requests: figures share no pyplot state."""
    report = build_report(Store.open(report_store.root), matrix=False)
    results, errors = [], []

    def render():
        try:
            results.append(render_report_body(report))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=render) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    assert {r.count("<svg") for r in results} == {8}

