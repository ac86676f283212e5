"""The status page (GET / on the admin API) in a real headless browser: Debian's chromium,
driven over the DevTools protocol (a websocket), against `fastgw run` with traffic. The
numbers the page shows (its elements' data-value / data-total) are checked against /metrics
and /histograms scraped once the traffic has stopped; a screenshot is kept as
build/test-artifacts/status.png."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from conftest import samples, stop_process

ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
TOKEN = "status-page-test-token"
# A name from the configuration goes into the page as text: never as HTML.
HOSTILE = '<img src=x onerror="document.title=1">&amp; "co"'


# ---- headless chromium over the DevTools protocol -------------------------------------------

class Page:
    """One browser tab: DevTools commands and the events the browser sent."""

    def __init__(self, ws):
        self.ws, self.next_id, self.pending, self.events = ws, 0, {}, []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            future = self.pending.pop(msg.get("id"), None)
            if future is None:
                self.events.append(msg)
            elif "error" in msg:
                future.set_exception(RuntimeError(f"DevTools: {msg['error']}"))
            else:
                future.set_result(msg.get("result", {}))

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        future = self.pending[self.next_id] = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return await asyncio.wait_for(future, 10)

    async def eval(self, expression: str):
        answer = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0):
        """The expression's value once truthy (polled every 50 ms until the deadline; an
        error, as while the page reloads, counts as false)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = await self.eval(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            await asyncio.sleep(0.05)
        shown = await self.eval("document.getElementById('status').textContent")
        raise AssertionError(f"not true within {timeout} s: {expression} (page status: {shown!r})")

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def screenshot(self, path: Path) -> None:
        """The whole page as a PNG (the viewport stretched to the page's height)."""
        height = await self.eval("document.documentElement.scrollHeight")
        await self.call("Emulation.setDeviceMetricsOverride", width=1200, height=height,
                        deviceScaleFactor=1, mobile=False)
        shot = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def problems(self) -> list[str]:
        """Script exceptions, and console entries of the page's script or its security
        policy (a blocked inline script or external asset)."""
        out = []
        for e in self.events:
            if e["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(e["params"]["exceptionDetails"])[:500])
            elif (e["method"] == "Log.entryAdded"
                  and e["params"]["entry"]["source"] in ("javascript", "security")):
                out.append(e["params"]["entry"]["text"])
        return out

    def requested(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e["method"] == "Network.requestWillBeSent"]


@pytest.fixture
async def browser(tmp_path):
    """`open_page()`: a new tab of a headless chromium this fixture starts (and stops)."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed: apt-get install -y chromium (.ci/run does)"
    profile = tmp_path / "chromium"
    log = (tmp_path / "chromium.log").open("w")
    proc = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-sync",
         "--disable-background-networking", "--disable-component-update", "--no-pings",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    sockets, pages = [], []
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (active.exists() and active.read_text().count("\n") >= 1):
            assert proc.poll() is None, f"chromium exited: {(tmp_path / 'chromium.log').read_text()}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port = int(active.read_text().split()[0])

        async def open_page() -> Page:
            async with aiohttp.ClientSession() as http:
                async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
                    target = await r.json()
            ws = await websockets.connect(target["webSocketDebuggerUrl"], max_size=None,
                                          ping_interval=None)
            sockets.append(ws)
            page = Page(ws)
            pages.append(page)
            for domain in ("Page", "Runtime", "Log", "Network"):
                await page.call(f"{domain}.enable")
            return page

        yield open_page
    finally:
        for ws in sockets:
            await ws.close()
        for page in pages:
            page.reader.cancel()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)     # its own session: only what it started
            proc.wait()
        log.close()


# ---- the gateway ------------------------------------------------------------------------------

def config(backend: int, workers: int, token: bool) -> str:
    admin = "admin: {host: 127.0.0.1, port: 0" + (", token-env: FASTGW_ADMIN_TOKEN}" if token else "}")
    return f"""\
workers: {workers}
{admin}
listeners:
  - host: 127.0.0.1
    port: 0
apis:
  - name: quotes
    path: /quotes
    assembly:
      - policy: count-limit
        key: global
        max: 3
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:{backend}/
        request:
          - policy: message-rate-limit
            messages: 5/1s
            burst: 5
            action: drop
  - name: {json.dumps(HOSTILE)}
    path: /chat
    assembly:
      - policy: websocket-upgrade
        target-url: ws://127.0.0.1:{backend}/
"""


class Gateway:
    def __init__(self, proc, port, admin_url, stderr):
        self.proc, self.port, self.admin_url, self.stderr = proc, port, admin_url, stderr

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"


@pytest.fixture
def status_gateway(tmp_path):
    """`start(backend_port, workers, token)`: `fastgw run` with its admin API, once it serves."""
    procs = []

    def start(backend: int, workers: int = 1, token: bool = False) -> Gateway:
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(config(backend, workers, token))
        err = tmp_path / "gateway.stderr"
        env = dict(os.environ, FASTGW_ADMIN_TOKEN=TOKEN)
        proc = subprocess.Popen([sys.executable, "-m", "fastgw", "run", "-c", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err.open("w"))
        procs.append(proc)
        ready = "workers (pids" if workers > 1 else "max-connections"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = err.read_text()
            port = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", text)
            admin = re.search(r"admin on (http://\S+)", text)
            if port and admin and ready in text:
                return Gateway(proc, int(port.group(1)), admin.group(1), err)
            assert proc.poll() is None, f"gateway exited: {text}"
            time.sleep(0.05)
        raise AssertionError(f"gateway did not start: {err.read_text()}")

    yield start
    for proc in procs:
        if proc.poll() is None:
            stop_process(proc)


async def scrape(gw: Gateway, token: bool = False) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{gw.admin_url}/metrics") as r:
            assert r.status == 200
            return samples(await r.text())


async def handshake_percentiles(gw: Gateway, api: str, token: bool = False) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{gw.admin_url}/histograms/{quote(api, safe='')}/handshake_us") as r:
            assert r.status == 200
            p = (await r.json())["percentiles"]
            return {"p50": p["50.0"], "p90": p["90.0"], "p99": p["99.0"]}


def by_labels(metrics: dict, name: str, *keys: str) -> dict:
    """{(label values...): value} of one metric's samples."""
    out = {}
    for (n, labels), v in metrics.items():
        if n == name:
            d = dict(labels)
            out[tuple(d.get(k, "") for k in keys)] = v
    return out


# What the page shows, read from its DOM in one go (one render).
SNAPSHOT = """(() => {
  const cell = (el) => ({text: el.textContent, value: el.dataset.value, total: el.dataset.total});
  const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)]
    .filter((tr) => tr.dataset.key !== "")
    .map((tr) => ({...tr.dataset, cells: Object.fromEntries([...tr.cells].map((td) => [td.dataset.field, cell(td)]))}));
  const ids = ["total-active", "rate-messages-request", "rate-messages-response", "rate-bytes-request",
               "rate-bytes-response", "rate-refused", "rate-limited"];
  return {scrapes: Number(document.body.dataset.scrapes), title: document.title,
          status: document.getElementById("status").dataset.state,
          workers: document.getElementById("workers").textContent,
          elements: document.querySelectorAll("img, iframe, object, embed, script").length,
          tiles: Object.fromEntries(ids.map((id) => [id, cell(document.getElementById(id))])),
          apis: rows("apis"), refusals: rows("refusals"), limited: rows("limited"),
          plots: [...document.querySelectorAll("svg.spark polyline")].map((p) => p.getAttribute("points"))};
})()"""


def number(cell: dict) -> float:
    return float(cell["value"])


async def chat(url: str, stop: asyncio.Event, sent: list, closing: asyncio.Event) -> None:
    """Echo ping-pong, about 25 messages a second, until stop (then `sent` gets the count of
    messages sent); the connection stays open until closing."""
    n = 0
    async with websockets.connect(url, compression=None) as ws:
        while not stop.is_set():
            await ws.send(f"message {n}")
            assert await asyncio.wait_for(ws.recv(), 5) == f"message {n}"
            n += 1
            await asyncio.sleep(0.04)
        sent.append(n)
        await closing.wait()


async def hold(url: str, opened: list, closing: asyncio.Event) -> None:
    async with websockets.connect(url, compression=None) as ws:
        opened.append(ws)
        await closing.wait()


# ---- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
async def test_status_page_shows_what_metrics_say(status_gateway, browser, echo_backend, workers):
    gw = status_gateway(echo_backend, workers=workers)
    page = await browser()
    stop, closing, opened, sent = asyncio.Event(), asyncio.Event(), [], []
    holders = [asyncio.create_task(hold(gw.ws("/quotes"), opened, closing)) for _ in range(3)]
    chats = [asyncio.create_task(chat(gw.ws("/chat"), stop, sent, closing)) for _ in range(2)]
    try:
        deadline = time.monotonic() + 10
        while len(opened) < 3:
            assert time.monotonic() < deadline, "the quotes connections did not open"
            await asyncio.sleep(0.02)
        # A refusal: the count-limit (global, 3) is full; another: no API at that path.
        for path in ("/quotes", "/nothing-here"):
            with pytest.raises(InvalidStatus):
                async with websockets.connect(gw.ws(path)):
                    pass
        # Limited messages: 10 at once on a flow of 5/1s with burst 5: 5 dropped. The echo of a
        # later message tells that the gateway has read (and counted) them all.
        ws = opened[0]
        for i in range(10):
            await ws.send(f"burst {i}")
        assert [await asyncio.wait_for(ws.recv(), 5) for _ in range(5)] == [f"burst {i}" for i in range(5)]

        await page.open(gw.admin_url + "/")
        # While the chat flows (2 x ~25 messages/s each way), the page shows a rate.
        await page.wait_for("""(() => { const r = Number(document.getElementById('rate-messages-request')
                                .dataset.value); return r >= 10 && r <= 150; })()""")
        await asyncio.sleep(0.3)                   # a token again (5/1s: one per 0.2 s)
        await ws.send("after")
        assert await asyncio.wait_for(ws.recv(), 5) == "after"
        stop.set()
        deadline = time.monotonic() + 5
        while len(sent) < 2:
            assert time.monotonic() < deadline and not any(t.done() for t in chats), "chat stuck"
            await asyncio.sleep(0.01)
        assert sum(sent) > 20

        # Two scrapes that started after the traffic stopped: the page and /metrics agree.
        n = await page.eval("Number(document.body.dataset.scrapes)")
        await page.wait_for(f"Number(document.body.dataset.scrapes) >= {n + 2}")
        shown = await page.eval(SNAPSHOT)
        metrics = await scrape(gw)
    finally:
        stop.set()
        closing.set()
        await asyncio.gather(*holders, *chats, return_exceptions=True)

    assert shown["status"] == "ok"
    assert shown["workers"] == ("one process" if workers == 1 else "2 workers")
    active = by_labels(metrics, "fastgw_connections_active", "api")
    assert active == {("quotes",): 3, (HOSTILE,): 2}
    rows = {row["api"]: row["cells"] for row in shown["apis"]}
    assert sorted(rows) == sorted([HOSTILE, "quotes"])
    # The API name is text: shown as written, no element made of it.
    assert rows[HOSTILE]["api"]["text"] == HOSTILE and shown["elements"] == 1   # the page's script
    assert shown["title"] == "fastgw status"
    assert number(shown["tiles"]["total-active"]) == 5
    messages = by_labels(metrics, "fastgw_messages_total", "api", "direction")
    bytes_ = by_labels(metrics, "fastgw_bytes_total", "api", "direction")
    upgrades = by_labels(metrics, "fastgw_connections_total", "api")
    for api, cells in rows.items():
        assert number(cells["active"]) == active[(api,)], api
        assert cells["active"]["text"] == str(int(active[(api,)]))
        assert number(cells["upgrades"]) == upgrades[(api,)]
        for d in ("request", "response"):
            assert float(cells[f"messages_{d}"]["total"]) == messages[(api, d)], (api, d)
            assert float(cells[f"bytes_{d}"]["total"]) == bytes_[(api, d)], (api, d)
            assert number(cells[f"messages_{d}"]) == 0, "the traffic stopped: no rate"
        assert {p: number(cells[p]) for p in ("p50", "p90", "p99")} == \
            await handshake_percentiles(gw, api), api
        assert cells["p50"]["text"].endswith(("µs", "ms"))
    # Counted as they arrive, dropped ones too (10 + 1); echoed: the 5 that passed, and 1.
    assert messages[("quotes", "request")] == 11 and messages[("quotes", "response")] == 6
    assert messages[(HOSTILE, "request")] == messages[(HOSTILE, "response")] == sum(sent)
    assert float(shown["tiles"]["rate-messages-request"]["total"]) == sum(
        v for (api, d), v in messages.items() if d == "request")

    refused = {k: v for k, v in by_labels(metrics, "fastgw_upgrades_rejected_total",
                                          "reason", "api").items() if v}
    assert refused == {("count_limit", "quotes"): 1, ("not_found", ""): 1}
    assert {(r["reason"], r["api"]): number(r["cells"]["total"]) for r in shown["refusals"]} == refused
    assert [r["cells"]["api"]["text"] for r in shown["refusals"]] == ["quotes", "(no API matched)"]
    assert float(shown["tiles"]["rate-refused"]["total"]) == 2
    limited = {k: v for k, v in by_labels(metrics, "fastgw_messages_limited_total",
                                          "api", "direction", "action").items() if v}
    assert limited == {("quotes", "request", "drop"): 5}
    assert {(r["api"], r["direction"], r["action"]): number(r["cells"]["total"])
            for r in shown["limited"]} == limited
    # Every plot has its points: the last ones of the connections are at the top, at the right.
    assert len(shown["plots"]) == 7 + 2 * 2 and all(shown["plots"])

    await page.screenshot(ARTIFACTS / ("status.png" if workers == 1 else f"status-{workers}w.png"))
    assert page.problems() == []
    assert all(url.startswith(gw.admin_url) for url in page.requested()), page.requested()
    # The gateway gone: the page says so (and keeps the last numbers, dimmed).
    stop_process(gw.proc)
    await page.wait_for("document.getElementById('status').dataset.state === 'error'")
    assert (await page.eval("document.getElementById('status').textContent")).startswith(
        "cannot read the admin API")
    assert await page.eval("document.getElementById('main').classList.contains('stale')")


async def test_status_page_with_a_token(status_gateway, browser, echo_backend):
    gw = status_gateway(echo_backend, workers=2, token=True)
    async with aiohttp.ClientSession() as http:
        # The page itself needs no token (it holds no data); its data does.
        async with http.get(f"{gw.admin_url}/") as r:
            assert r.status == 200 and r.content_type == "text/html"
            policy = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "connect-src 'self'" in policy
            body = await r.text()
            assert TOKEN not in body
        async with http.get(f"{gw.admin_url}/metrics") as r:
            assert r.status == 401
        async with http.post(f"{gw.admin_url}/") as r:
            assert r.status == 401

    page = await browser()
    closing, opened = asyncio.Event(), []
    holders = [asyncio.create_task(hold(gw.ws("/chat"), opened, closing)) for _ in range(2)]
    try:
        await page.open(gw.admin_url + "/")
        state = "document.getElementById('status').dataset.state"
        await page.wait_for(f"{state} === 'unauthorized'")
        assert await page.eval("document.getElementById('main').hidden"
                               " && !document.getElementById('login').hidden")
        assert await page.eval("document.getElementById('status').textContent") == \
            "401: the admin API needs its token"
        assert "admin.token-env" in await page.eval("document.getElementById('login-why').textContent")
        await page.screenshot(ARTIFACTS / "status-token.png")

        submit = ("(() => { document.getElementById('token').value = %s;"
                  " document.getElementById('login').requestSubmit(); return true; })()")
        await page.eval(submit % json.dumps("not the token"))
        await page.wait_for(f"{state} === 'unauthorized' && document.getElementById('status')"
                            ".textContent.includes('refused this token')")
        assert await page.eval("document.getElementById('main').hidden")

        await page.eval(submit % json.dumps(TOKEN))
        await page.wait_for(f"{state} === 'ok' && Number(document.body.dataset.scrapes) >= 2")
        assert await page.eval(f"sessionStorage.getItem('fastgw-admin-token') === {json.dumps(TOKEN)}")
        deadline = time.monotonic() + 10
        while len(opened) < 2:
            assert time.monotonic() < deadline, "the connections did not open"
            await asyncio.sleep(0.02)
        await page.wait_for("Number(document.getElementById('total-active').dataset.value) === 2")
        shown = await page.eval(SNAPSHOT)
        metrics = await scrape(gw, token=True)
        # Kept for the tab: a reload asks for nothing; until forgotten.
        await page.open(gw.admin_url + "/")
        await page.wait_for(f"{state} === 'ok'")
        await page.eval("document.getElementById('forget').click()")
        await page.wait_for(f"{state} === 'unauthorized' && sessionStorage.length === 0")
    finally:
        closing.set()
        await asyncio.gather(*holders, return_exceptions=True)
    active = by_labels(metrics, "fastgw_connections_active", "api")
    assert {row["api"]: number(row["cells"]["active"]) for row in shown["apis"]} == \
        {api: v for (api,), v in active.items()} == {HOSTILE: 2, "quotes": 0}
    assert shown["workers"] == "2 workers"
    assert [p for p in page.problems() if "401" not in p] == []
    assert all(url.startswith(gw.admin_url) for url in page.requested())
