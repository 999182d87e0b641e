"""The labeling page in Debian's headless Chromium, driven by Playwright: the browser tests use it,
and `vqa-rlhf docs --pictures` takes the docs' screenshot with it."""
from __future__ import annotations

import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from rewards.label_app import make_server
from rewards.label_store import LabelStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium calls Google's hosts at every start.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def labeling_page(store: LabelStore, query: str, token: str | None = None):
    """The label server on a free local port and its page open in headless Chromium at `query`:
    yields (page, the page's JavaScript errors); closes the browser and the server after."""
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        raise FileNotFoundError("Debian chromium is not installed (apt-get install chromium)")
    server = make_server(store, "127.0.0.1", 0, token=token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/?{query}")
            yield page, errors
            browser.close()
    finally:
        server.shutdown()
        server.server_close()


def screenshot_labeling_page(db: Path, out: Path) -> Path:
    """A PNG of the page as a labeler sees it, on a copy of the label store (the store is not touched)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "labels.db"
        shutil.copyfile(db, copy)
        store = LabelStore(copy)
        try:
            with labeling_page(store, "labeler=docs") as (page, _):
                page.locator("#question").wait_for()
                page.set_viewport_size({"width": 900, "height": 640})
                page.screenshot(path=str(out))
        finally:
            store.close()
    return out
