"""Headless Chromium driven over the DevTools protocol, for the HTML reports' browser test.

Opens a local file in a fresh browser profile and records what a person would not see: every network
request the page makes, console errors and uncaught exceptions; evaluates DOM queries; writes a
screenshot. Uses ``websocket-client`` (a test extra) and Chromium from the system (``make test``
installs Debian's ``chromium`` when it can).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class PageVisit:
    """What loading one page did: requests (URLs), errors (console and exceptions), query answers."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    answers: dict[str, object] = field(default_factory=dict)


class Browser:
    """One headless Chromium, one tab; ``visit`` a file with JavaScript on or off."""

    def __init__(self, executable: str) -> None:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="dtypelab-chromium-")
        self.process = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", "--window-size=1100,1400", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = self._devtools_url()
        self.socket = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _devtools_url(self) -> str:
        """The browser's DevTools websocket, from the ``DevToolsActivePort`` file it writes (port, path)."""
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lines = marker.read_text().split() if marker.exists() else []
            if len(lines) == 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("chromium did not start its DevTools endpoint")

    def call(self, method: str, session: bool = False, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def visit(self, path: Path, queries: dict[str, str], screenshot: Path | None = None,
              javascript: bool = True) -> PageVisit:
        """Load ``path`` (file://), wait for its load event, answer ``queries`` (name -> JS expression)."""
        self.events.clear()
        self.call("Emulation.setScriptExecutionDisabled", session=True, value=not javascript)
        self.call("Page.navigate", session=True, url=path.resolve().as_uri())
        self._wait_for("Page.loadEventFired")
        visit = PageVisit()
        self.call("Emulation.setScriptExecutionDisabled", session=True, value=False)  # to ask the DOM
        for name, expression in queries.items():
            result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
            visit.answers[name] = result.get("result", {}).get("value")
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Network.requestWillBeSent":
                visit.requests.append(params["request"]["url"])
            elif method == "Runtime.exceptionThrown":
                visit.errors.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                visit.errors.append(" ".join(str(a.get("value")) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                visit.errors.append(params["entry"].get("text", ""))
        if screenshot is not None:
            shot = self.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return visit

    def _wait_for(self, method: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any(e.get("method") == method for e in self.events):
                return
            self.events.append(json.loads(self.socket.recv()))
        raise RuntimeError(f"no {method} within {seconds} s")

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            self.process.wait(timeout=10)
            shutil.rmtree(self.profile, ignore_errors=True)
