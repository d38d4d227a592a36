"""``report.html`` opened in a real headless browser (Debian's ``chromium``): every figure must
load and the page must log no error.

The browser is driven through the DevTools protocol over ``--remote-debugging-pipe`` (JSON
messages separated by NUL bytes on file descriptors 3 and 4), so the test needs nothing beyond
the standard library and the ``chromium`` package. Without chromium the tests are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # the evaluation behind the report takes ~15 s of CPU

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-pipe",
)
# every <img>: its alt text, whether it finished loading and its decoded width (0 if broken)
IMAGES_JS = (
    "Array.from(document.images).map(i => ({alt: i.alt,"
    " src: i.src.startsWith('data:') ? i.src.slice(0, 40) + '...' : i.src,"
    " complete: i.complete, width: i.naturalWidth}))"
)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    found = [shutil.which(name) for name in CHROMIUM_NAMES]
    return next((path for path in found if path), None)


@dataclass
class PageCheck:
    """What the browser saw on one page."""

    images: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        return [image for image in self.images if not image["complete"] or image["width"] == 0]


class HeadlessChromium:
    """A headless Chromium process spoken to with the DevTools protocol over a pipe."""

    def __init__(self, executable: str, profile: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def give_fds_3_and_4() -> None:  # the protocol pipe ends Chromium expects
            read_end, write_end = os.dup(to_browser_read), os.dup(from_browser_write)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self._log = profile / "chromium.log"  # a file, not a pipe: chromium must never block
        with self._log.open("wb") as log:
            self.process = subprocess.Popen(
                [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=give_fds_3_and_4,  # noqa: PLW1509 - no threads are started before it
                pass_fds=(3, 4),
            )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        os.close(self._to_browser)
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._from_browser)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                log = self._log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"chromium closed the DevTools pipe; its log ends:\n{log}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        """Call one DevTools method and return its result (events met meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") != self._next_id:
                self.events.append(answer)
                continue
            if "error" in answer:
                raise RuntimeError(f"{method}: {answer['error']}")
            return answer["result"]

    def wait_for(self, method: str, session: str) -> None:
        deadline = time.monotonic() + self.timeout
        seen = lambda e: e.get("method") == method and e.get("sessionId") == session  # noqa: E731
        while not any(seen(event) for event in self.events):
            self.events.append(self._read_message(deadline))

    def check_page(self, url: str) -> PageCheck:
        """Open ``url`` in a new tab, wait for its load event, list its images and errors."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session)
        self.send("Page.navigate", session, url=url)
        self.wait_for("Page.loadEventFired", session)
        images = self.send("Runtime.evaluate", session, expression=IMAGES_JS, returnByValue=True)
        self.send("Runtime.evaluate", session, expression="0")  # flush late console events
        return PageCheck(images=images["result"]["value"], errors=_errors(self.events, session))


def _errors(events: list[dict[str, Any]], session: str) -> list[str]:
    """Console errors, uncaught exceptions and browser log errors (failed loads) of a tab."""
    errors = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled" and params["type"] in (
            "error",
            "assert",
        ):
            texts = [str(arg.get("value", arg.get("description"))) for arg in params["args"]]
            errors.append("console: " + " ".join(texts))
        elif event.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            errors.append("exception: " + details.get("exception", {}).get("description", ""))
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            errors.append(f"log: {entry['text']} {entry.get('url', '')}".strip())
    return errors


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "no chromium on PATH: report.html is not opened in a browser "
            "(Debian: apt-get install chromium; .ci/run installs it)"
        )
    chromium = HeadlessChromium(executable, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real evaluation report: shipped classifier and ComDefend, 4 embedded sample images,
    FGSM, a feature-squeezing detector (so all three figures are drawn)."""
    pytest.importorskip("matplotlib")
    from typer.testing import CliRunner

    from comdefend.cli import app

    out = tmp_path_factory.mktemp("report") / "fashion"
    args = [
        "evaluate", "--dataset", "fashion-mnist", "--split", "sample",
        "--classifier", "fashion-cnn", "--defense", "none",
        "--defense", "comdefend:comdefend-fashion-mnist", "--attack", "fgsm",
        "--eps", "8", "--n", "4", "--batch-size", "4", "--detector", "squeeze",
        "--detector-holdout", "16", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_report_html_loads_every_figure_without_errors(browser: HeadlessChromium, report: Path):
    files = json.loads((report / "results.json").read_text())["files"]
    figures = [name for name in files if name.endswith(".png")]
    assert len(figures) == 3, figures  # accuracy, detector ROC, image grid
    check = browser.check_page((report / "report.html").as_uri())
    assert check.errors == []
    assert check.broken_images == []
    assert len(check.images) == len(figures)
    assert all(image["width"] > 0 for image in check.images)


def test_the_browser_check_sees_a_broken_image_and_a_console_error(
    browser: HeadlessChromium, report: Path, tmp_path: Path
) -> None:
    """The same report with one image pointing at a missing file, one with an undecodable
    image, and one with a script error: each must be caught."""
    page = (report / "report.html").read_text()
    start = page.index('src="data:image/png;base64,') + len('src="')
    end = page.index('"', start)
    missing = tmp_path / "missing.html"
    missing.write_text(page[:start] + "accuracy-that-is-not-there.png" + page[end:])
    check = browser.check_page(missing.as_uri())
    assert len(check.broken_images) == 1
    assert check.broken_images[0]["src"].endswith("accuracy-that-is-not-there.png")
    assert any("ERR_FILE_NOT_FOUND" in error for error in check.errors), check.errors

    undecodable = tmp_path / "undecodable.html"
    undecodable.write_text(page[:start] + "data:image/png;base64,iVBORw0KGgoAAAA" + page[end:])
    assert len(browser.check_page(undecodable.as_uri()).broken_images) == 1

    scripted = tmp_path / "scripted.html"
    scripted.write_text(page.replace("</body>", "<script>console.error('broken');</script></body>"))
    check = browser.check_page(scripted.as_uri())
    assert check.broken_images == [] and check.errors == ["console: broken"]
