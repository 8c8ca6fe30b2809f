"""A headless Chromium driven over the DevTools protocol (aiohttp's websocket client, a Ray
dependency): navigate, evaluate JavaScript, click, wait for text, take screenshots. Enough to
check a single-page app such as the MLflow UI, which `--dump-dom` alone cannot drive."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """`async with Browser(chromium, profile_dir) as b: await b.goto(url)`."""

    def __init__(self, chromium: str, profile: Path, width: int = 1600, height: int = 1000):
        self.chromium, self.profile, self.size = chromium, profile, (width, height)
        self.proc, self.ws, self.session, self._id = None, None, None, 0

    async def __aenter__(self):
        import aiohttp

        port = free_port()
        self.proc = subprocess.Popen(
            [self.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", f"--window-size={self.size[0]},{self.size[1]}",
             "--no-first-run", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.session = aiohttp.ClientSession()
        base, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            try:
                async with self.session.get(f"{base}/json/list") as resp:
                    pages = [t for t in await resp.json() if t.get("type") == "page"]
                if pages:
                    break
            except (aiohttp.ClientError, ValueError):
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                await self.close()
                raise RuntimeError("headless Chromium did not open its DevTools port")
            await asyncio.sleep(0.3)
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Emulation.setDeviceMetricsOverride", width=self.size[0],
                        height=self.size[1], deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def send(self, method: str, **params):
        self._id += 1
        mine = self._id
        await self.ws.send_str(json.dumps({"id": mine, "method": method, "params": params}))
        while True:
            msg = json.loads((await asyncio.wait_for(self.ws.receive(), 120)).data)
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def eval(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout: float = 90, what: str = ""):
        """Poll `expression` until it is truthy; its value."""
        deadline, value = time.time() + timeout, None
        while time.time() < deadline:
            try:
                value = await self.eval(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            await asyncio.sleep(0.5)
        text = await self.text()
        raise AssertionError(f"timed out waiting for {what or expression}; page text: "
                             f"{text[:1500]!r}")

    async def wait_for_text(self, *needles: str, timeout: float = 90) -> str:
        cond = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in needles)
        await self.wait_for(f"document.body && {cond}", timeout, what=f"text {needles}")
        return await self.text()

    async def text(self) -> str:
        return await self.eval("document.body ? document.body.innerText : ''") or ""

    async def location(self) -> str:
        return await self.eval("location.href")

    async def click_text(self, text: str, selector: str = "*") -> bool:
        """Click the innermost visible element matching `selector` whose text is `text`."""
        return await self.eval(
            f"(() => {{ const els = [...document.querySelectorAll({json.dumps(selector)})]"
            f".filter(e => e.innerText && e.innerText.trim() === {json.dumps(text)} && "
            "e.offsetParent !== null); const el = els[els.length - 1]; "
            "if (!el) return false; el.scrollIntoView({block: 'center'}); el.click(); "
            "return true; })()")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
