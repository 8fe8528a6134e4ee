"""A real headless Chromium that opens a page and says what a person would see: driven over the DevTools
protocol on a pipe (``--remote-debugging-pipe``: commands on its fd 3, replies and events on its fd 4, one
NUL-terminated JSON message each), so no websocket client is needed."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-pipe",
)
IMAGES_JS = (
    "JSON.stringify({images: Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight]),"
    " tags: document.getElementsByTagName('img').length, text: document.body.innerText.length})"
)


def chromium_binary() -> str | None:
    """The installed Chromium (Debian's ``chromium``) or Chrome, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageLoad:
    """What loading a page gave: console errors and uncaught exceptions, every URL requested, each <img>
    as (complete, naturalWidth, naturalHeight), the <img> tags in the DOM, the length of the visible text,
    and a PNG screenshot of the viewport."""

    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    images: list[tuple[bool, int, int]] = field(default_factory=list)
    img_tags: int = 0
    text_length: int = 0
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int, deadline: float) -> None:
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, deadline
        self.buffer, self.count, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.count += 1
        message = {"id": self.count, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.count:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def receive(self) -> dict:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.read_fd], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                raise EOFError("Chromium closed its DevTools pipe")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self.receive())


def _collect(load: PageLoad, events: list[dict]) -> None:
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            load.console_errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            load.console_errors.append(params["exceptionDetails"].get("text", "Uncaught exception"))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            load.console_errors.append(params["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            load.requests.append(params["request"]["url"])


def load_page(
    url: str, profile: Path, *, width: int = 1280, height: int = 2000, timeout_s: float = 90
) -> PageLoad:
    """Open ``url`` in a fresh headless Chromium (profile folder ``profile``) with a ``width`` x ``height``
    viewport, wait for its load event and report what it showed."""
    binary = chromium_binary()
    if binary is None:
        raise FileNotFoundError("no Chromium installed")
    commands_read, commands_write = os.pipe()
    events_read, events_write = os.pipe()

    def child() -> None:  # the DevTools pipe is fds 3 and 4 in the browser
        to_browser, from_browser = os.dup(commands_read), os.dup(events_write)
        os.dup2(to_browser, 3)
        os.dup2(from_browser, 4)

    browser = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        close_fds=False,
        preexec_fn=child,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(commands_read)
    os.close(events_write)
    pipe = _Pipe(commands_write, events_read, time.monotonic() + timeout_s)
    load = PageLoad()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            pipe.send(f"{domain}.enable", session=session)
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        pipe.send("Emulation.setDeviceMetricsOverride", metrics, session=session)
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_for("Page.loadEventFired")
        found = pipe.send(
            "Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True}, session=session
        )
        seen = json.loads(found["result"]["value"])
        load.images = [tuple(i) for i in seen["images"]]
        load.img_tags, load.text_length = seen["tags"], seen["text"]
        shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session=session)
        load.screenshot = base64.b64decode(shot["data"])
        _collect(load, pipe.events)
        with contextlib.suppress(EOFError):  # it may close the pipe before it answers
            pipe.send("Browser.close")
        browser.wait(timeout=30)
    finally:
        if browser.poll() is None:
            browser.kill()
            browser.wait()
        os.close(commands_write)
        os.close(events_read)
    return load
