"""Headless Chromium (Debian's ``chromium`` package) driven over the DevTools protocol.

The protocol runs on a pipe (``--remote-debugging-pipe``: the browser reads commands on its
fd 3 and writes replies and events on fd 4, each a JSON text ending in NUL), so no port is
opened and nothing beyond the standard library is needed. ``Browser.load`` records every
request the page makes (Network.requestWillBeSent), which is how a test proves that a page
loaded nothing from the network; ``evaluate`` reads the rendered DOM; ``screenshot`` takes
the whole page as PNG.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--mute-audio", "--hide-scrollbars"]


class BrowserError(AssertionError):
    pass


class Browser:
    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0) -> None:
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed (scripts/install-system-deps.sh installs it)")
        self.profile = tempfile.mkdtemp(prefix="dv-chromium-")
        to_browser, self._w = os.pipe()
        self._r, from_browser = os.pipe()
        # bash puts the pipe ends at fds 3 and 4, where the browser looks for them, by way of
        # fds 100 and 101 (either end may already be 3 or 4); dash takes one-digit fds only.
        strays = " ".join(f"{fd}<&-" for fd in (to_browser, from_browser) if fd not in (3, 4))
        cmd = (f'exec "$0" "$@" 100<&{to_browser} 101>&{from_browser} {strays} 3<&100 4>&101 100<&- 101>&-')
        self.proc = subprocess.Popen(
            ["bash", "-c", cmd, CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
             f"--window-size={width},{height}"],
            pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=None if os.environ.get("DV_BROWSER_DEBUG") else subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.timeout = timeout
        self._buf = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=True)

    # ------------------------------------------------------------------ the pipe
    def _send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._w, data):]

    def _recv(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise BrowserError("chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium closed the pipe (exit {self.proc.poll()})")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        out: dict[str, Any] = json.loads(msg)
        return out

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self._send(msg)
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def _wait_event(self, method: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not any(e["method"] == method for e in self.events):
            self.events.append(self._recv(deadline))

    # ------------------------------------------------------------------ pages
    def load(self, url: str, *, settle: float = 1.0) -> list[str]:
        """Open ``url``; the URLs of every request the page made (its own included), waiting
        ``settle`` seconds after the load event for late ones."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        self._wait_event("Page.loadEventFired", self.timeout)
        end = time.monotonic() + settle
        while True:
            try:
                self.events.append(self._recv(end))
            except BrowserError:
                break
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def evaluate(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in r:
            raise BrowserError(f"script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, path: Path, *, full_page: bool = True) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            w, h = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.call("Page.captureScreenshot", params, session=True)["data"])
        path.write_bytes(data)
        return data

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
