"""The documentation site builds offline with no warning and covers the package.

The site is built once per module (``sphinx-build -W``, as the README says, into a temporary
folder): every public name of ``pyro_vae.__all__`` and every module below ``cli`` has an API entry,
every command of the parser has a section on the CLI page, every notebook a tutorial page, and no
page loads a script, a style sheet or an image from another host. In headless Chromium (skipped,
saying why, where Chromium, its driver or selenium is missing) the math is typeset by the local
MathJax and every resource of the pages loads.

``python tests/test_docs.py DIR`` builds the site and saves screenshots of the landing page, an API
page and a tutorial into DIR.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import pyro_vae
from pyro_vae.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000",
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]  # no name resolves: nothing leaves
#: page -> what it shows: math on every one of them, a figure on the tutorial
PAGES = {"index.html": "landing", "api/infer.html": "api", "tutorials/notebooks/04_latent_space.html": "tutorial"}


def build(out: Path) -> subprocess.CompletedProcess:
    """The README's command, ``sphinx-build -W -b html docs OUT`` (warnings are errors)."""
    return subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(DOCS), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("sphinx", reason="the docs extra is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("docs") / "html"
    proc = build(out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def inventory(site: Path) -> dict:
    """``{object name: page}`` of every object the site documents (its ``objects.inv``)."""
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as f:
        inv = InventoryFile.load(f, "", lambda base, uri: uri)
    return {name: getattr(entry, "uri", None) or entry[2] for objects in inv.values() for name, entry in objects.items()}


def public_modules() -> list:
    """Every module of the package below the command line (the API pages' floors)."""
    names = []
    for info in pkgutil.walk_packages(pyro_vae.__path__, "pyro_vae."):
        if not info.name.startswith(("pyro_vae.cli", "pyro_vae.__main__")):
            names.append(info.name)
    return names


def test_every_public_name_has_an_api_entry(site):
    documented = inventory(site)
    missing = []
    for name in pyro_vae.__all__:
        obj = getattr(pyro_vae, name)
        where = f"{obj.__module__}.{obj.__qualname__}"
        if not documented.get(where, "").startswith("api/"):
            missing.append(where)
    assert not missing, f"no API entry (add an automodule line to docs/api/*.rst): {missing}"


def test_every_module_has_an_api_section(site):
    documented = inventory(site)
    missing = [m for m in public_modules() if not documented.get(m, "").startswith("api/")]
    assert not missing, f"modules on no API page (add an automodule line to docs/api/*.rst): {missing}"


def commands(parser, path=()):
    """``(path, parser)`` of every command and sub-command: ``(("train",), ...)``, ``(("cache", "list"), ...)``."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from commands(sub, path + (name,))


def test_every_command_has_a_section_with_all_its_flags(site):
    page = (site / "cli.html").read_text()
    found = list(commands(build_parser()))
    assert {p[0] for p, _ in found} >= {"train", "evaluate", "compare-guides", "grad-variance", "cache", "runs"}
    for path, parser in found:
        anchor = f'<span id="cli-{"-".join(path)}">'
        assert anchor in page, f"no section for pyro-vae {' '.join(path)}"
        section = page.split(anchor, 1)[1].split('<span id="cli-', 1)[0]
        terms = " ".join(re.sub(r"<[^>]+>", "", term) for term in re.findall(r"<dt\b.*?</dt>", section, re.S))
        for action in parser._actions:
            for flag in action.option_strings:
                if action.dest != "help":
                    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", terms), (path, flag)


def test_every_notebook_is_a_tutorial_with_its_figures(site):
    total = 0
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = site / "tutorials" / "notebooks" / f"{notebook.stem}.html"
        assert page.is_file(), f"no tutorial page for {notebook.name}"
        figures = notebook.read_text().count('"image/png"')  # the committed outputs' figures
        assert page.read_text().count("<img") >= figures, notebook.name
        total += figures
    assert total > 0


def test_no_page_loads_anything_from_another_host(site):
    remote = re.compile(r'<(script|img|iframe)\b[^>]*\bsrc="(https?:)?//|<link\b[^>]*\bhref="(https?:)?//[^"]*"[^>]*>', re.I)
    pages = list(site.rglob("*.html"))
    assert len(pages) > 10
    offenders = {str(p.relative_to(site)): m.group(0) for p in pages for m in [remote.search(p.read_text())] if m}
    assert not offenders, offenders
    stylesheets = [p for p in pages if re.search(r'<link\b[^>]*rel="stylesheet"[^>]*href="(https?:)?//', p.read_text())]
    assert not stylesheets


def test_mathjax_is_the_local_copy(site):
    page = (site / "api" / "infer.html").read_text()
    src = re.search(r'<script[^>]*src="([^"]*tex-chtml\.js)"', page).group(1)
    assert not src.startswith(("http", "//")) and (site / "api" / src).resolve().is_file(), src


# ---- in a real browser -------------------------------------------------------------------------------


def chromium():
    """A headless Chromium driven by selenium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("Chromium or chromedriver is not installed (Debian: apt-get install chromium chromium-driver)")
    return open_browser(webdriver, browser, driver_path)


def open_browser(webdriver, browser: str, driver_path: str):
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver_path), options=options)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(folder: Path):
    """The folder over HTTP on the loopback address (a browser records timings and status codes of
    HTTP resources, not of ``file://`` ones); yields the base URL."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def open_page(driver, url: str) -> dict:
    """Load a page, wait for MathJax to finish, and say what the page holds and what it loaded."""
    driver.get(url)
    driver.set_script_timeout(60)
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const typeset = () => MathJax.startup.promise.then(() => document.fonts.ready).then(() => done(true));"
        "const wait = () => (window.MathJax && MathJax.startup && MathJax.startup.promise) ? typeset()"
        "  : (document.readyState === 'complete' && !document.querySelector('script[src*=\"tex-chtml\"]'))"
        "  ? done(false) : setTimeout(wait, 50);"
        "wait();")
    return driver.execute_script(
        "return {math: document.querySelectorAll('mjx-container').length,"
        " errors: document.querySelectorAll('mjx-merror').length,"
        " images: Array.from(document.images).map(i => [i.currentSrc, i.complete && i.naturalWidth > 0]),"
        " fonts: Array.from(document.fonts).filter(f => f.status === 'error').map(f => f.family),"
        " resources: performance.getEntriesByType('resource').map(e => [e.name, e.responseStatus])}")


def test_math_is_typeset_and_every_resource_loads_in_chromium(site):
    driver = chromium()
    try:
        with serve(site) as base:
            for page, kind in PAGES.items():
                seen = open_page(driver, base + page)
                failures = [e["message"] for e in driver.get_log("browser")  # the browser asks for /favicon.ico itself
                            if e["level"] == "SEVERE" and "/favicon.ico" not in e["message"]]
                assert seen["math"] > 0 and seen["errors"] == 0, (page, seen["math"], seen["errors"])
                assert all(ok for _, ok in seen["images"]), (page, [s for s, ok in seen["images"] if not ok])
                assert not seen["fonts"] and not failures, (page, seen["fonts"], failures)
                loaded = {url: status for url, status in seen["resources"] if not url.endswith("/favicon.ico")}
                assert all(url.startswith(base) for url in loaded), (page, list(loaded))  # nothing from elsewhere
                assert all(200 <= status < 400 for status in loaded.values()), (page, loaded)
                assert any(url.endswith("tex-chtml.js") for url in loaded), page
                assert any("/mathjax/" in url and url.endswith(".woff") for url in loaded), page  # its fonts
                if kind == "tutorial":
                    assert len(seen["images"]) >= 3, page
        seen = open_page(driver, (site / "api" / "infer.html").as_uri())  # opened as a file, as on a train
        assert seen["math"] > 0 and seen["errors"] == 0
    finally:
        driver.quit()


def screenshots(site: Path, out: Path) -> list:
    """Save a screenshot of each page in PAGES into ``out``; the API page scrolled to a displayed
    equation and the tutorial to its first figure."""
    import selenium.webdriver as webdriver

    out.mkdir(parents=True, exist_ok=True)
    driver = open_browser(webdriver, shutil.which("chromium"), shutil.which("chromedriver"))
    saved = []
    try:
        for page, kind in PAGES.items():
            open_page(driver, (site / page).as_uri())
            target = {"api": "[id='module-pyro_vae.infer.iwae'] div.math",
                      "tutorial": "div.cell_output img"}.get(kind)
            if target:
                driver.execute_script(f"const e = document.querySelector({target!r}); if (e) e.scrollIntoView();"
                                      "window.scrollBy(0, -120);")
            path = out / f"docs_{kind}.png"
            driver.save_screenshot(str(path))
            saved.append(path)
    finally:
        driver.quit()
    return saved


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "screens")
    html = Path(tempfile.mkdtemp(prefix="pyro-vae-docs-")) / "html"
    proc = build(html)
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    for path in screenshots(html, out):
        print(path)
