"""`dvc plots show` / `dvc plots diff` pages render in a browser with no network.

The repository's .dvc/config points `plots.html_template` at a template with
Vega, Vega-Lite and Vega-Embed inlined (pipeline/plotpage.py, built by
.ci/setup). Headless Chromium, with name resolution and proxying closed, loads
the page DVC writes: every metric must be drawn. DVC's default page (CDN
scripts) is loaded the same way to prove the browser really is offline.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from chromium import dump_dom, non_white_share, screenshot
from dvc_render.html import PAGE_HTML

from tests.repo_copy import copy_repo, dvc, run

METRICS_DIR = Path("dvclive/plots/metrics")
CDN = re.compile(r"cdn\.|jsdelivr|unpkg|googleapis|cloudflare", re.I)
# A fetched resource in the page: <script src=http..>, <link href=http..>, import("http..").
REMOTE_LOAD = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//|import\s*\(\s*["'](https?:)?//""", re.I)
# Measured: the reference run's 7-plot page at 1000x1600 has 5.7 % non-white pixels; DVC's CDN page
# offline has 0.0 % (all white). 2 %, about a third of the drawn page, leaves room for fonts and
# antialiasing while a page with a few plots missing or only text would fall below it.
MIN_NON_WHITE = 0.02


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git copy of this repository (its committed reference dvclive/) with the template built."""
    repo = copy_repo(tmp_path_factory.mktemp("plots") / "repo")
    run(["git", "init", "-q"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], repo)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], repo)
    assert not (repo / ".dvc/vega-offline.html").exists(), "the built template must not be committed"
    run([sys.executable, "-m", "pipeline.plotpage"], repo)  # what .ci/setup runs
    return repo


def metrics(repo: Path) -> dict[str, int]:
    """metric name -> number of logged steps, from the TSV files DVCLive wrote."""
    return {p.stem: len(p.read_text().splitlines()) - 1 for p in sorted((repo / METRICS_DIR).glob("*.tsv"))}


def drawn_curves(dom: str) -> dict[str, list[int]]:
    """metric name -> points of each line drawn in its plot's <svg class="marks">, sorted.

    DVC's linear template draws two lines per revision: the values and a smoothed copy.
    """
    out: dict[str, list[int]] = {}
    for chunk in dom.split('<div id="dvclive_plots_metrics_')[1:]:
        name = chunk.split('_tsv"', 1)[0]
        svg = re.search(r'<svg[^>]*class="marks".*?</svg>', chunk, re.S)
        lines = re.findall(r'aria-roledescription="line mark" d="M([^"]*)"', svg.group(0)) if svg else []
        out[name] = sorted(d.count("L") + 1 for d in lines)
    return out


def assert_no_network_references(html: str) -> None:
    assert not CDN.search(html), CDN.search(html)
    assert not REMOTE_LOAD.search(html), REMOTE_LOAD.search(html)


def test_plots_show_draws_every_metric_offline(repo: Path, tmp_path: Path) -> None:
    dvc(repo, "plots", "show")
    page = repo / "dvc_plots/index.html"
    html = page.read_text()
    assert_no_network_references(html)
    expected = metrics(repo)
    assert len(expected) >= 7, expected
    assert drawn_curves(dump_dom(page, tmp_path / "profile")) == {m: [n, n] for m, n in expected.items()}
    share = non_white_share(screenshot(page, tmp_path / "shot.png", tmp_path / "profile2"))
    print(f"plots show: non-white share {share:.4f}")
    assert share > MIN_NON_WHITE


def test_plots_diff_draws_both_revisions_offline(repo: Path, tmp_path: Path) -> None:
    # a workspace run that differs from HEAD: one step fewer
    for tsv in (repo / METRICS_DIR).glob("*.tsv"):
        tsv.write_text("".join(tsv.read_text().splitlines(keepends=True)[:-1]))
    try:
        dvc(repo, "plots", "diff", "HEAD")
        page = repo / "dvc_plots/index.html"
        assert_no_network_references(page.read_text())
        head = {m: n + 1 for m, n in metrics(repo).items()}
        drawn = drawn_curves(dump_dom(page, tmp_path / "profile"))
        assert drawn == {m: [n - 1, n - 1, n, n] for m, n in head.items()}
    finally:
        run(["git", "checkout", "--", str(METRICS_DIR)], repo)


def test_dvc_default_page_is_blank_in_this_offline_browser(repo: Path, tmp_path: Path) -> None:
    """The bug the template fixes, reproduced: proves the browser above had no network."""
    default = tmp_path / "default.html"
    default.write_text(PAGE_HTML)
    dvc(repo, "plots", "show", "--html-template", str(default), "-o", str(tmp_path / "out"))
    page = tmp_path / "out/index.html"
    assert CDN.search(page.read_text())
    drawn = drawn_curves(dump_dom(page, tmp_path / "profile"))
    assert drawn == {m: [] for m in metrics(repo)}
    assert non_white_share(screenshot(page, tmp_path / "shot.png", tmp_path / "profile2")) < 0.001


def test_without_the_built_template_dvc_refuses_instead_of_using_a_cdn(repo: Path, tmp_path: Path) -> None:
    """A clone before .ci/setup: `dvc plots show` fails; it never writes a page that needs the internet."""
    template = repo / ".dvc/vega-offline.html"
    template.rename(tmp_path / "kept.html")
    try:
        res = dvc(repo, "plots", "show", "-o", str(tmp_path / "out"), check=False)
        assert res.returncode != 0
        assert "HTML template has to contain '{plot_divs}'" in res.stderr + res.stdout
        assert not (tmp_path / "out/index.html").exists()
    finally:
        (tmp_path / "kept.html").rename(template)
