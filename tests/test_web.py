"""The web chat page in headless Chromium (Debian `chromium`), driven over the DevTools protocol as
a person would use it: type a question, press Enter, watch the answer stream in, ask again (the
page keeps the history), clear. Screenshots are checked for the chat bubbles."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest

import glm2rs

websocket = pytest.importorskip("websocket")
Image = pytest.importorskip("PIL.Image")

USER_BUBBLE = (0xD9, 0xE8, 0xFF)


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    if os.environ.get("CI") == "true":
        pytest.fail("chromium not found (CI=true: .ci/run installs it)")
    pytest.skip("chromium not installed")


class Browser:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="glm2rs-chromium-")
        self.proc = subprocess.Popen(
            [chromium_path(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={self.dir}",
             "--window-size=900,700", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.dir, "DevToolsActivePort")
        end = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.time() > end or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0

    def cmd(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr):
        r = self.cmd("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def wait(self, expr, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if self.js(expr):
                return
            time.sleep(0.05)
        raise TimeoutError(expr)

    def type_and_enter(self, selector, text):
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.cmd("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.cmd("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                     **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self):
        import base64

        png = base64.b64decode(self.cmd("Page.captureScreenshot", format="png")["data"])
        return Image.open(io.BytesIO(png)).convert("RGB")

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.dir, ignore_errors=True)


def count_color(img, rgb, tol=3):
    import numpy as np

    px = np.asarray(img, dtype=np.int16)
    return int((np.abs(px - np.array(rgb, dtype=np.int16)) <= tol).all(axis=-1).sum())


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def test_web_chat_in_chromium(model, browser, tmp_path):
    with glm2rs.Server(model, port=0) as s:
        b = browser
        b.cmd("Page.enable")
        b.cmd("Page.navigate", url=s.url + "/")
        b.wait("document.readyState === 'complete' && !!document.getElementById('input')")
        # greedy, short answers so that they can be checked against the model
        b.js("document.getElementById('temperature').value = '0'; document.getElementById('max_tokens').value = '24'")
        # count the updates of the answer bubble: it must grow in several steps (streaming)
        b.js("""window.updates = 0; new MutationObserver(() => window.updates++)
                .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})""")
        q1, q2 = "你好", "再说一遍"
        b.type_and_enter("#input", q1)
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 1")
        a1 = b.js("document.querySelector('.assistant').textContent")
        assert a1 == model.chat(q1, max_new_tokens=24, do_sample=False)[0]
        assert b.js("window.updates") > 3
        assert b.js("document.querySelector('.user').textContent") == q1
        assert "tokens/s" in b.js("document.getElementById('status').textContent")
        # the second question goes with the history of the first
        b.type_and_enter("#input", q2)
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 2")
        a2 = b.js("document.querySelectorAll('.assistant')[1].textContent")
        assert a2 == model.chat(q2, history=[(q1, a1)], max_new_tokens=24, do_sample=False)[0]
        shot = b.screenshot()
        shot.save(tmp_path / "chat.png")
        assert shot.size[0] >= 800
        assert count_color(shot, USER_BUBBLE) > 500  # the two question bubbles are drawn
        # clear empties the conversation (and its history: the next answer is a first turn again)
        b.js("document.getElementById('clear').click()")
        assert b.js("document.querySelectorAll('.msg').length") == 0
        shot = b.screenshot()
        shot.save(tmp_path / "cleared.png")
        assert count_color(shot, USER_BUBBLE) == 0
        b.type_and_enter("#input", q2)
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 1")
        assert b.js("document.querySelector('.assistant').textContent") == model.chat(
            q2, max_new_tokens=24, do_sample=False)[0]


def test_web_page_shows_server_errors(model, browser):
    with glm2rs.Server(model, port=0, api_key="k") as s:
        b = browser
        b.cmd("Page.navigate", url=s.url + "/")
        b.wait("document.readyState === 'complete' && !!document.getElementById('input')")
        b.js("localStorage.removeItem('glm2rs-key'); document.getElementById('key').value = ''")
        b.type_and_enter("#input", "hi")
        b.wait("document.querySelectorAll('.error').length === 1")
        assert "API key" in b.js("document.querySelector('.error').textContent")
        # with the key the same page works
        b.js("document.getElementById('key').value = 'k'; document.getElementById('max_tokens').value = '4'")
        b.type_and_enter("#input", "hi")
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 1")
