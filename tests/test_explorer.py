"""``pyro-vae explore``: the page, opened from a ``file://`` path in headless Chromium, decodes like
the package's decoder in torch, answers a drag on the map, and loads nothing from any network; the
command refuses a missing run, an unsupported run and a folder it would overwrite, in one line.

The browser tests need Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package
(the ``test`` extra); without them they are skipped, saying which is missing.
"""

import html
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from pyro_vae import VAEConfig, explore, fit
from pyro_vae.cli import main
from pyro_vae.core.errors import ConfigError, DataError
from pyro_vae.experiments.explorer import DATA_FILE, PAGE_DIR, PAGE_FILES, inline_page

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
except ImportError:  # the test extra installs it
    webdriver = None

MISSING = [what for what, found in (("chromium", CHROMIUM), ("chromedriver (Debian: chromium-driver)", CHROMEDRIVER),
                                    ("the selenium package", webdriver)) if not found]
needs_browser = pytest.mark.skipif(bool(MISSING), reason=f"headless browser tests need {', '.join(MISSING)}")

TINY = dict(hidden=(32,), epochs=1, batch_size=50, limit=200, val_size=100)
RUNS = {  # the pixel checks: a 2-d and a 50-d run, every likelihood, and M2
    "2d-bernoulli": dict(z_dim=2),
    "50d-normal": dict(z_dim=50, likelihood="normal", binarize="none"),
    "m2-3d-continuous-bernoulli": dict(model="m2", z_dim=3, num_labels=20, labelled_batch=20,
                                       likelihood="continuous-bernoulli", binarize="none"),
}


def _train(folder: Path, **settings):
    return fit(VAEConfig(**{**TINY, **settings}), out=folder, progress=False, log=lambda line: None)


def _colour_images(n: int, seed: int) -> torch.Tensor:
    """``[n, 3, 8, 8]`` smooth random colour images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=8, mode="bilinear"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{name: (run, page folder)}`` for every entry of ``RUNS``, and a run on colour images handed
    over in Python: trained a few steps, then explored."""
    root = tmp_path_factory.mktemp("explorer")
    found = {}
    for name, settings in RUNS.items():
        run = _train(root / name, **settings)
        explore(run, root / f"{name}-page")
        found[name] = (run, root / f"{name}-page")
    colour = fit(VAEConfig(**{**TINY, "z_dim": 4, "likelihood": "continuous-bernoulli", "binarize": "none"}),
                 out=root / "colour", train_data=_colour_images(100, 0), progress=False, log=lambda line: None)
    explore(colour, root / "colour-page", data=_colour_images(30, 1))
    found["colour-4d-given-data"] = (colour, root / "colour-page")
    return found


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with its console and network events recorded, in a fresh profile."""
    profile = tempfile.mkdtemp(prefix="pyro-vae-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1300,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(driver, folder: Path) -> str:
    """Load ``folder/index.html`` from its ``file://`` URL; wait for ``explorer.ready``."""
    url = (folder / "index.html").resolve().as_uri()
    driver.get_log("performance")  # drop earlier pages' events
    driver.get_log("browser")
    driver.get(url)
    state = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.explorer.ready.then(() => done('ready'), (e) => done('failed: ' + e.message));")
    assert state == "ready"
    return url


@needs_browser
@pytest.mark.parametrize("name", [*RUNS, "colour-4d-given-data"])
def test_page_decodes_like_torch(runs, browser, name):
    run, folder = runs[name]
    _open(browser, folder)
    d = run.config.z_dim
    g = torch.Generator().manual_seed(0)
    zs = torch.cat([torch.zeros(1, d), 2 * torch.randn(4, d, generator=g)])  # up to about 6 prior sigmas out
    labels = range(run.config.num_classes) if run.config.model == "m2" else [None]
    worst = 0.0
    for z in zs:
        for y in labels:
            page = torch.tensor(browser.execute_script("return window.explorer.decode(arguments[0], arguments[1])",
                                                       z.tolist(), y), dtype=torch.float64)
            with torch.no_grad():
                mean = run.vae.decode_mean(z[None]) if y is None else run.vae.decode_mean(torch.tensor([y]), z[None])
            assert page.shape == (run.config.x_dim,) and 0 <= page.min() and page.max() <= 1
            worst = max(worst, (page - mean[0].double()).abs().max().item())
    assert worst < 1e-4, f"largest pixel difference page vs torch: {worst:.2e}"


@needs_browser
def test_drag_on_the_map_redraws_and_moves_z_within_the_plane(runs, browser):
    run, folder = runs["50d-normal"]
    _open(browser, folder)
    browser.execute_script("window.explorer.select(7)")
    before = browser.execute_script("return document.getElementById('decoded').toDataURL()")
    z_before = torch.tensor(browser.execute_script("return window.explorer.z"), dtype=torch.float64)
    area = browser.find_element(By.ID, "map")
    ActionChains(browser).move_to_element_with_offset(area, -80, -60).click_and_hold() \
        .move_by_offset(60, 20).move_by_offset(60, 40).release().perform()
    after = browser.execute_script("return document.getElementById('decoded').toDataURL()")
    z = torch.tensor(browser.execute_script("return window.explorer.z"), dtype=torch.float64)
    assert after != before, "the drawn image did not change"
    axes = torch.tensor(browser.execute_script("return window.PYRO_VAE_EXPLORER.projection.axes"),
                        dtype=torch.float64)  # [2, 50]
    assert torch.allclose(axes @ axes.T, torch.eye(2, dtype=axes.dtype), atol=1e-5)  # PCA: orthonormal rows
    moved = z - z_before
    assert moved.norm() > 0.1
    assert torch.allclose(moved, axes.T @ (axes @ moved), atol=1e-4)  # only within the map's plane
    drawn = torch.tensor(browser.execute_script("return window.explorer.image"), dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(drawn, run.vae.decode_mean(z[None].float())[0].double(), atol=1e-4)


@needs_browser
def test_page_loads_only_its_own_files_and_nothing_fails(runs, browser):
    _, folder = runs["m2-3d-continuous-bernoulli"]
    url = _open(browser, folder)
    browser.find_element(By.CSS_SELECTOR, ".class-cell:nth-child(3)").click()  # the class picker
    assert browser.execute_script("return window.explorer.y") == 2
    events = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    sent = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in events
            if e["method"] == "Network.requestWillBeSent" and e["params"].get("documentURL") == url}
    names = {u.rsplit("/", 1)[-1] for u in sent.values() if u.startswith("file://")}
    assert names == {"index.html", *PAGE_FILES, DATA_FILE}
    assert all(u.startswith(("file://", "data:")) for u in sent.values()), sorted(sent.values())
    failed = [sent[e["params"]["requestId"]] for e in events
              if e["method"] == "Network.loadingFailed" and e["params"]["requestId"] in sent]
    assert not failed
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors


@needs_browser
def test_page_without_its_weights_says_so(runs, browser, tmp_path):
    _, folder = runs["2d-bernoulli"]
    for name in PAGE_FILES:
        shutil.copy(folder / name, tmp_path / name)
    browser.get((tmp_path / "index.html").as_uri())
    assert "weights.js is missing" in browser.find_element(By.ID, "error").text


# ----------------------------------------------------------------------------- the command's refusals


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_missing_run_is_one_line(tmp_path, capsys):
    out = tmp_path / "page"
    assert main(["explore", str(tmp_path / "no-such-run"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error:") and "no such run folder" in err and err.count("\n") == 1
    assert not out.exists()


def test_unsupported_run_is_one_line(tmp_path, capsys):
    conv = tmp_path / "conv"
    _train(conv, z_dim=2, arch="conv", limit=50, val_size=20)
    out = tmp_path / "page"
    assert main(["explore", str(conv), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot explore this run" in err and "arch=conv" in err and err.count("\n") == 1
    assert not out.exists()


def test_run_on_data_given_in_python_needs_its_images(runs, tmp_path):
    run, _ = runs["colour-4d-given-data"]
    with pytest.raises(DataError, match="shape 3x8x8"):  # its config names mnist-5k: 1x28x28 images
        explore(run, tmp_path / "page")
    assert not (tmp_path / "page").exists()


def test_own_decoder_is_refused_in_python(tmp_path):
    decoder = nn.Sequential(nn.Linear(2, 784))
    run = fit(VAEConfig(**{**TINY, "z_dim": 2, "limit": 50, "val_size": 20}), progress=False, log=lambda line: None,
              decoder=decoder)
    with pytest.raises(ConfigError, match="your own decoder"):
        explore(run, tmp_path / "page")
    assert not (tmp_path / "page").exists()


def test_existing_folder_needs_overwrite_and_keeps_its_files(runs, tmp_path, capsys):
    run, _ = runs["2d-bernoulli"]
    out = tmp_path / "page"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["explore", str(run.path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.count("\n") == 1
    assert _files(out) == {"notes.txt": b"mine"}
    assert main(["explore", str(run.path), "--out", str(out), "--overwrite", "--images", "50"]) == 0
    written = _files(out)
    assert set(written) == {"notes.txt", "index.html", *PAGE_FILES, DATA_FILE} and written["notes.txt"] == b"mine"
    assert main(["explore", str(run.path), "--out", str(out)]) == 2  # a page written before: not replaced either
    assert _files(out) == written


@needs_browser
def test_inline_page_works_in_an_iframe_srcdoc(runs, browser, tmp_path):
    """What notebook 04 shows: the page with its files inlined, in an ``<iframe srcdoc>``."""
    run, folder = runs["2d-bernoulli"]
    page = inline_page(folder)
    assert "<script src=" not in page and 'rel="stylesheet"' not in page
    outer = tmp_path / "notebook.html"
    outer.write_text(f'<iframe srcdoc="{html.escape(page)}" width="1200" height="900"></iframe>')
    browser.get(outer.as_uri())
    browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
    try:
        state = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "window.explorer.ready.then(() => done('ready'), (e) => done('failed: ' + e.message));")
        assert state == "ready"
        assert browser.execute_script("return window.explorer.zDim") == run.config.z_dim
    finally:
        browser.switch_to.default_content()


# ----------------------------------------------------------------------------- the copy in the docs

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOCS_RUN = DOCS / "explorer_run"  # the docs run's weights.js; docs/conf.py adds the package's page files
MAX_DOCS_WEIGHTS = 2_000_000  # bytes of base64 decoder weights the site may carry


def _page_data(folder: Path) -> dict:
    text = (folder / DATA_FILE).read_text()
    return json.loads(text[text.index("{"): text.rindex("}") + 1])


def test_docs_explorer_is_current_and_small(runs):
    """The site's explorer data (docs/explorer_run/weights.js, written by pyro-vae explore) has today's
    data format; regenerate it with the command in docs/tutorials/explorer.md when this fails."""
    docs, fresh = _page_data(DOCS_RUN), _page_data(runs["2d-bernoulli"][1])
    assert docs["format"] == fresh["format"] and set(docs) == set(fresh)
    assert set(docs["run"]) == set(fresh["run"]) and docs["run"]["data"] == "mnist-5k"
    weights = sum(len(layer["weight"]) + len(layer["bias"]) for layer in docs["decoder"]["layers"])
    assert weights <= MAX_DOCS_WEIGHTS


@needs_browser
def test_docs_explorer_opens(browser, tmp_path):
    for src in [PAGE_DIR / name for name in PAGE_FILES] + [DOCS_RUN / DATA_FILE]:  # as docs/conf.py assembles it
        (tmp_path / src.name).write_bytes(src.read_bytes())
    _open(browser, tmp_path)
    image = browser.execute_script("return window.explorer.decode([0, 0])")
    assert len(image) == 784 and 0 <= min(image) and max(image) <= 1
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
