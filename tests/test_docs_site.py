"""The documentation site: built with ``mkdocs build --strict`` (as scripts/test.sh builds it),
opened from file:// in a real headless Chromium (Playwright, the system's /usr/bin/chromium)
that follows every navigation link, searches, and must not send a request off the machine; the
tables in the README and on the Results page are what the records in results/ generate."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from playwright.sync_api import expect, sync_playwright

from cifar100.api import __all__ as API_NAMES
from cifar100.cli import COMMANDS, build_parser
from cifar100.records.table import write_tables

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
STEP_TIMEOUT_MS = 60_000  # a ceiling for one page on a busy 2-core machine, never a wait
BUILD_TIMEOUT_S = 300
LOCAL = ("file://", "http://127.0.0.1", "data:", "blob:", "about:")
# The files whose generated tables must match the records (README: the headline).
GENERATED = ["README.md", "docs/results.md", "docs/index.md"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site as `mkdocs build --strict` writes it; a warning (a broken link, a missing
    page, an unknown anchor) fails the build."""
    out = tmp_path_factory.mktemp("docs") / "site"
    source = str(ROOT / "src")  # the hook renders this checkout's parsers
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    env["NO_MKDOCS_2_WARNING"] = "1"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr[-4000:]}"
    return out


def local_file(url: str) -> Path:
    return Path(unquote(urlsplit(url).path))


def test_every_page_opens_offline_in_chromium(site):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install it (apt-get install -y chromium)")
    requests: list[str] = []
    visited: dict[str, str] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, timeout=STEP_TIMEOUT_MS
        )
        try:
            context = browser.new_context()
            # every request of every page and worker passes here: recorded, and refused if it
            # would leave the machine (so a failing run sends nothing either)
            context.route("**/*", lambda route: record(route, requests))
            page = context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.goto((site / "index.html").as_uri(), wait_until="load")
            nav = page.eval_on_selector_all(
                "nav.md-nav--primary a.md-nav__link[href]", "links => links.map(a => a.href)"
            )
            pages = list(dict.fromkeys(url.split("#")[0] for url in nav))
            for url in pages:
                assert url.startswith("file://"), f"a navigation link leaves the site: {url}"
                assert local_file(url).is_file(), f"navigation link to a missing page: {url}"
                page.goto(url, wait_until="load")
                visited[url] = page.locator("article h1").first.inner_text().rstrip("¶").strip()
                check_links(page, url)
            assert_local(requests)
            search_from_file(page, site)
        finally:
            browser.close()
    titles = set(visited.values())
    for title in ["Getting started", "Results", "CLI reference", "Python API", "Reproducibility"]:
        assert title in titles, f"no page titled {title!r} in the navigation: {sorted(titles)}"
    assert len(visited) == len(list(site.glob("*.html"))) - 1  # every page but 404.html
    assert_local(requests)
    assert any(url.endswith(".css") for url in requests)  # the recording saw the page load


def search_from_file(page, site: Path) -> None:
    """The search box answers from file:// (its worker runs through the vendored shim, the
    index is inlined by the offline plugin) and leads to the page that holds the word."""
    page.goto((site / "index.html").as_uri(), wait_until="load")
    page.keyboard.press("/")  # Material's shortcut: focus the search box
    page.keyboard.type("distillation")
    meta = page.locator(".md-search-result__meta")
    expect(meta).to_contain_text("matching document", timeout=STEP_TIMEOUT_MS)
    first = page.locator(".md-search-result__link").first.get_attribute("href")
    assert urlsplit(first).path.endswith("/distillation.html"), first


def assert_local(requests: list[str]) -> None:
    outside = [url for url in requests if not url.startswith(LOCAL)]
    assert not outside, f"the site asked for something outside the machine: {outside}"


def record(route, requests: list[str]) -> None:
    url = route.request.url
    requests.append(url)
    if url.startswith(LOCAL):
        route.continue_()
    else:
        route.abort()


def check_links(page, url: str) -> None:
    """Every link on the page into the site names a file that exists."""
    hrefs = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
    for href in hrefs:
        if href.startswith("file://"):
            target = local_file(href.split("#")[0])
            assert target.exists(), f"{url} links to a missing file: {href}"


def test_the_cli_reference_is_every_parser_s_help(site):
    text = re.sub(r"<[^>]+>", "", (site / "cli.html").read_text())
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS)
    for name, sub in subparsers.choices.items():
        assert f"usage: cifar100 {name}" in text, f"{name} has no section"
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in text, f"cifar100 {name} {flag} is missing from the reference"


def test_the_python_api_page_documents_every_public_name(site):
    html = (site / "api.html").read_text()
    missing = [name for name in API_NAMES if f'id="cifar100.api.{name}"' not in html]
    assert not missing, f"cifar100.api names without a section on the API page: {missing}"


@pytest.mark.parametrize("name", GENERATED)
def test_the_tables_are_what_the_records_generate(name, tmp_path):
    """Nothing in these tables is typed by hand: regenerating them from results/ changes
    nothing (after adding a record: cifar100 compare results/*.json --readme FILE ...)."""
    committed = ROOT / name
    copy = tmp_path / committed.name
    shutil.copy(committed, copy)
    write_tables(sorted((ROOT / "results").glob("*.json")), readme=copy)
    assert copy.read_text() == committed.read_text(), (
        f"{name} is not what results/*.json generate: run "
        f"cifar100 compare results/*.json --readme {name}"
    )


def test_user_docs_speak_of_the_project_not_its_history():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            assert not re.search(r"\bissues? \d", line, re.I), f"{page.name}:{number}: {line}"
