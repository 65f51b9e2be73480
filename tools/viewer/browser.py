"""Headless Chromium driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``).

Standard library only: no websocket client, no chromedriver. Used by the viewer's browser test and
by ``tools/dev/bench_viewer.py``. Debian: ``apt-get install -y chromium``; ``LOWBIT_CHROMIUM`` overrides
which executable is used.

    with Browser() as browser:
        browser.open(pathlib.Path("view.html"))
        browser.wait_for("window.__firstRenderMs")
        browser.screenshot("view.png")
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pathlib
import select
import shutil
import subprocess
import tempfile
import time

EXECUTABLE_VARIABLE = "LOWBIT_CHROMIUM"
EXECUTABLE_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
LAUNCH_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)
_COMMAND_FD, _REPLY_FD = 3, 4  # where Chromium reads commands and writes replies with --remote-debugging-pipe


class BrowserError(RuntimeError):
    pass


def find_chromium() -> str | None:
    """The Chromium executable: ``$LOWBIT_CHROMIUM``, else the first of ``EXECUTABLE_NAMES`` on PATH."""
    override = os.environ.get(EXECUTABLE_VARIABLE)
    if override:
        return override if shutil.which(override) else None
    return next((path for path in map(shutil.which, EXECUTABLE_NAMES) if path), None)


class Browser:
    """One headless Chromium with one page, controlled with DevTools commands.

    ``requests`` lists every URL the page asked for (Network domain), so a test can check that a page
    loads nothing from outside; ``errors`` lists the page's uncaught exceptions.
    """

    def __init__(self, width: int = 1400, height: int = 900, timeout: float = 60.0, executable: str | None = None):
        executable = executable or find_chromium()
        if executable is None:
            raise BrowserError(f"no Chromium found (install Debian's 'chromium' or set ${EXECUTABLE_VARIABLE})")
        self.timeout = timeout
        self.requests: list[str] = []
        self.errors: list[str] = []
        self._profile = tempfile.mkdtemp(prefix="lowbit-chromium-")
        command_read, self._command_write = os.pipe()
        self._reply_read, reply_write = os.pipe()

        def attach_pipes() -> None:  # in the child: the pipe ends become fds 3 and 4
            for source, target in ((command_read, _COMMAND_FD), (reply_write, _REPLY_FD)):
                high = fcntl.fcntl(source, fcntl.F_DUPFD, 10)
                os.dup2(high, target)
                os.close(high)

        self._process = subprocess.Popen(
            [executable, *LAUNCH_FLAGS, f"--user-data-dir={self._profile}", f"--window-size={width},{height}"]
            + ["about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=attach_pipes,
            close_fds=False,  # our other fds are non-inheritable (PEP 446); 3 and 4 must stay open
        )
        os.close(command_read)
        os.close(reply_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        self._session = None
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
            attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)
            self._session = attached["sessionId"]
            for domain in ("Page", "Runtime", "Network"):
                self.call(f"{domain}.enable")
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            self.call("Emulation.setDeviceMetricsOverride", metrics)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self.call("Browser.close", session=False, timeout=5)
            except (BrowserError, OSError):
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for fd in (self._command_write, self._reply_read):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def call(self, method: str, params: dict | None = None, session: bool = True, timeout: float | None = None) -> dict:
        """Send one DevTools command and wait for its reply; events that arrive meanwhile are kept."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self._session:
            message["sessionId"] = self._session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self._on_event(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._reply_read], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer within {self.timeout:.0f} s")
            chunk = os.read(self._reply_read, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium exited (status {self._process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _on_event(self, event: dict) -> None:
        if event["method"] == "Network.requestWillBeSent":
            self.requests.append(event["params"]["request"]["url"])
        elif event["method"] == "Runtime.exceptionThrown":
            details = event["params"]["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        self._events.append(event)

    def open(self, path: pathlib.Path | str) -> None:
        """Load a local file (or URL) and wait for its load event."""
        url = pathlib.Path(path).resolve().as_uri() if not str(path).startswith(("file:", "about:")) else str(path)
        self._events.clear()
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while not any(event["method"] == "Page.loadEventFired" for event in self._events):
            self._on_event(self._read(deadline))

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited); page errors raise."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"page error: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None, interval: float = 0.05):
        """Poll ``expression`` until its JSON value is truthy (use ``!!`` for DOM nodes); return it."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression!r}")
            time.sleep(interval)

    def click(self, x: float, y: float) -> None:
        """A left click at page coordinates, as real mouse events."""
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def click_element(self, selector: str) -> None:
        """Scroll the first element matching a CSS selector into view and click its centre."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e) return null; e.scrollIntoView({block: 'nearest', inline: 'nearest'});"
            " const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()"
        )
        if box is None:
            raise BrowserError(f"no element matches {selector!r}")
        self.click(*box)

    def type_text(self, text: str) -> None:
        self.call("Input.insertText", {"text": text})

    def press(self, key: str, code: int) -> None:
        """Press and release a key, e.g. ``press("Enter", 13)``."""
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", {"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code})

    def screenshot(self, path: pathlib.Path | str) -> pathlib.Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path = pathlib.Path(path)
        path.write_bytes(base64.b64decode(data))
        return path
