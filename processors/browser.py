"""Headless Chromium over the DevTools protocol: open a page as a reader would, and photograph it.

Used by the report's browser test and by ``make docs-images``. It drives the system's Chromium
(Debian's ``chromium`` package; ``make chromium`` installs it) with ``--remote-debugging-port=0``
and talks to it over a websocket with aiohttp, which NudgeFlow already depends on: no browser
download, no extra library. Every step has a deadline and the browser is always shut down.

    python -m processors.browser report.html out.png   # a picture of the page's top
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Per image: loaded, its natural size, and how many of its sampled pixels differ from the
# top-left (background) pixel: a blank or broken chart has none.
_IMAGES_JS = """
(() => Array.from(document.images).map((img) => {
  const out = {id: img.id, alt: img.alt, complete: img.complete,
               width: img.naturalWidth, height: img.naturalHeight, ink: 0};
  if (!img.complete || !img.naturalWidth) return out;
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  const step = 4 * 7;
  for (let i = 0; i < d.length; i += step) {
    if (Math.abs(d[i] - d[0]) + Math.abs(d[i + 1] - d[1]) + Math.abs(d[i + 2] - d[2]) > 30) {
      out.ink += 1;
    }
  }
  return out;
}))()
"""


class BrowserError(RuntimeError):
    """Chromium is missing, did not start, or did not answer in time."""


def find_chromium() -> str | None:
    explicit = os.environ.get("NUDGEFLOW_CHROMIUM")
    if explicit:
        return explicit
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageCheck:
    """What a reader's browser saw."""

    title: str
    console_errors: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)  # results of the extra expressions


class Chromium:
    """One headless browser with one page; ``async with Chromium() as b: ...``."""

    def __init__(self, binary: str | None = None, timeout_s: float = 30.0) -> None:
        found = binary or find_chromium()
        if found is None:
            raise BrowserError("chromium not found (make chromium installs it)")
        self.binary = found
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._profile: str | None = None
        self._session: Any = None
        self._ws: Any = None
        self.events: list[dict[str, Any]] = []

    async def __aenter__(self) -> Chromium:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        import aiohttp

        self._profile = tempfile.mkdtemp(prefix="nudgeflow-chromium-")
        argv = [
            self.binary, "--headless=new", "--disable-gpu", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-sync",
            "--disable-background-networking", "--disable-dev-shm-usage", "--mute-audio",
            "--hide-scrollbars", "--remote-debugging-port=0", "--remote-allow-origins=*",
            f"--user-data-dir={self._profile}", "about:blank",
        ]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        try:
            self._proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:
            raise BrowserError(f"chromium could not be started: {exc.strerror}") from None
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while not (port_file.exists() and port_file.read_text().strip()):
            if self._proc.poll() is not None:
                raise BrowserError(f"chromium exited at start (code {self._proc.returncode})")
            if time.monotonic() > deadline:
                raise BrowserError("chromium did not open its DevTools port in time")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        base = f"http://127.0.0.1:{port}"
        pages: list[dict[str, Any]] = []
        while not pages:
            async with self._session.get(f"{base}/json/list") as resp:
                pages = [t for t in await resp.json() if t.get("type") == "page"]
            if not pages:
                if time.monotonic() > deadline:
                    raise BrowserError("chromium has no page to drive")
                await asyncio.sleep(0.05)
        self._ws = await self._session.ws_connect(
            pages[0]["webSocketDebuggerUrl"], max_msg_size=0, heartbeat=None
        )

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One DevTools command; events that arrive meanwhile are kept in ``events``."""
        ident = next(self._ids)
        await self._ws.send_str(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + self.timeout_s
        while True:
            data = await self._receive(deadline, f"{method}: no answer", f"{method}: the")
            if data.get("id") == ident:
                if "error" in data:
                    raise BrowserError(f"{method}: {data['error'].get('message')}")
                result: dict[str, Any] = data.get("result", {})
                return result

    async def wait_event(self, method: str) -> dict[str, Any]:
        for e in self.events:
            if e["method"] == method:
                return e
        deadline = time.monotonic() + self.timeout_s
        while True:
            data = await self._receive(deadline, f"no {method}", "the")
            if data.get("method") == method:
                return data

    async def _receive(self, deadline: float, late: str, closed: str) -> dict[str, Any]:
        """The next message before ``deadline``; an event is also kept in ``events``. Errors
        start with ``late`` (timed out) or ``closed`` (the connection went away)."""
        import aiohttp

        left = deadline - time.monotonic()
        if left <= 0:
            raise BrowserError(f"{late} in {self.timeout_s:g}s")
        msg = await self._ws.receive(timeout=left)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise BrowserError(f"{closed} DevTools connection closed")
        data: dict[str, Any] = json.loads(msg.data)
        if "method" in data:
            self.events.append(data)
        return data

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def open(self, path: Path, width: int = 1280, height: int = 900) -> None:
        """Load a local file and wait for its load event (images decoded)."""
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.events.clear()
        await self.send("Page.navigate", {"url": path.resolve().as_uri()})
        await self.wait_event("Page.loadEventFired")

    def console_errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                out.append(str(p.get("exceptionDetails", {}).get("text")))
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(str(p["entry"].get("text")))
        return out

    async def screenshot(self, target: Path, width: int = 1280, height: int = 2000) -> None:
        """PNG of the page's top ``width`` x ``height`` CSS pixels (less if the page is shorter)."""
        full = await self.evaluate("document.documentElement.scrollHeight")
        clip_h = min(height, int(full or height))
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": clip_h, "deviceScaleFactor": 1, "mobile": False},
        )
        shot = await self.send(
            "Page.captureScreenshot",
            {"format": "png", "clip": {"x": 0, "y": 0, "width": width, "height": clip_h,
                                       "scale": 1}},
        )  # fmt: skip
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        if self._ws is not None:
            try:
                await asyncio.wait_for(self._ws.close(), 5)
            except (TimeoutError, OSError):
                pass
            self._ws = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None


async def check_page(
    path: Path,
    expressions: dict[str, str] | None = None,
    screenshot: Path | None = None,
    timeout_s: float = 30.0,
) -> PageCheck:
    """Open ``path`` in headless Chromium; its console errors, its images, extra values."""
    async with Chromium(timeout_s=timeout_s) as browser:
        await browser.open(path)
        title = await browser.evaluate("document.title")
        images = await browser.evaluate(_IMAGES_JS)
        values = {k: await browser.evaluate(v) for k, v in (expressions or {}).items()}
        await asyncio.sleep(0.2)  # late console messages
        await browser.evaluate("0")  # drains the events that arrived meanwhile
        if screenshot is not None:
            await browser.screenshot(screenshot)
        return PageCheck(str(title), browser.console_errors(), list(images), values)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m processors.browser PAGE.html PICTURE.png", file=sys.stderr)
        return 2
    page, picture = Path(args[0]), Path(args[1])
    try:
        seen = asyncio.run(check_page(page, screenshot=picture))
    except BrowserError as exc:
        print(f"browser: {exc}", file=sys.stderr)
        return 1
    if seen.console_errors:
        print(f"browser: console errors: {seen.console_errors}", file=sys.stderr)
        return 1
    print(f"{picture}: {len(seen.images)} charts on the page")
    return 0


if __name__ == "__main__":
    sys.exit(main())
