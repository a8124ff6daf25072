"""Flower as a person sees it: its pages rendered by headless Chromium (Debian's ``chromium``).

Two ``syncer worker`` processes on one host with their default node names, Flower behind
basic auth, a real run from ``syncer plan --wait``. The browser loads the tasks page and the
workers page; DataTables fills both with JavaScript (``--virtual-time-budget``), and the
DOM Chromium dumps afterwards is what a person reads:

- every image of the run is a row whose ``args`` cell is ``SRC -> DST`` and whose
  ``kwargs`` cell is the run id (workers/flowerconfig.py), on one of the two workers;
- 2 workers online, each with its own counters, processed = succeeded, totals = the run;
- no credentials, or a wrong password: every page answers 401 and nothing renders;
- /metrics and /healthcheck answer without credentials (Flower exempts them; the README says
  so) and /metrics names no image, registry or run.

Chromium reaches only loopback: every other host name resolves to nothing and any other
request goes to a dead proxy on 127.0.0.1:9 (Chromium still *tries* its update and sign-in
services; :meth:`Visit.outside` lists those attempts, and the test checks none was answered).
A screenshot of the tasks page is kept in the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from tests.support import images
from tests.support.celery_workers import SYNCER, FlowerProcess, GroupProcess, run_syncer
from tests.support.clients import write_auth_file
from tests.support.ports import wait_until

pytestmark = pytest.mark.integration

SRC_REPO, DST_REPO = "src/app", "dst/app"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: The columns ``syncer flower`` shows by default (workers/flowerconfig.py).
COLUMNS = ["state", "args", "kwargs", "worker", "runtime", "received", "uuid"]
#: Default node names of ``syncer worker``: ``syncer-<6 hex>@<host>``.
NODE = r"syncer-[0-9a-f]{6}@\S+"


def require_chromium() -> str:
    """Chromium's path; skip without it (fail in CI, where a skip would hide the gap)."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must install it: see .ci/run)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


# --------------------------------------------------------------------------- the browser


class Page(HTMLParser):
    """What a rendered page shows: the text of each ``<tbody>`` row's cells, the ``data-column``
    slugs of the header cells, and the text of elements with an ``id``."""

    def __init__(self, dom: str):
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.columns: list[str] = []
        self.by_id: dict[str, str] = {}
        self._in_tbody = False
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._open_ids: list[tuple[str, str, list[str]]] = []  # (tag, id, text parts)
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "th" and found.get("data-column") and found["data-column"] not in self.columns:
            self.columns.append(found["data-column"] or "")
        if found.get("id"):
            self._open_ids.append((tag, found["id"] or "", []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self._in_tbody = False
        elif tag == "td" and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.rows.append(self._row)
            self._row = None
        if self._open_ids and self._open_ids[-1][0] == tag:
            _, ident, parts = self._open_ids.pop()
            self.by_id[ident] = " ".join("".join(parts).split())

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, _, parts in self._open_ids:
            parts.append(data)

    def records(self) -> list[dict[str, str]]:
        """The body rows as ``{column slug: cell text}`` (needs ``data-column`` headers)."""
        return [dict(zip(self.columns, row, strict=False)) for row in self.rows]


@dataclass
class Visit:
    """One page load: the DOM after scripts ran, and every request's response status lines."""

    dom: str
    statuses: dict[str, list[int]] = field(default_factory=dict)  # URL (no query) -> statuses

    @property
    def page(self) -> Page:
        return Page(self.dom)

    def outside(self) -> dict[str, list[int]]:
        """Requests Chromium made to anything but 127.0.0.1, with the statuses they got."""
        return {url: codes for url, codes in self.statuses.items()
                if urllib.parse.urlsplit(url).hostname != "127.0.0.1"}


class Browser:
    """Headless Chromium, one fresh profile per visit, confined to loopback."""

    def __init__(self, directory: Path):
        self.binary = require_chromium()
        self.directory = directory
        self.visits = 0

    def visit(self, url: str, *, screenshot: Path | None = None, budget_ms: int = 4000) -> Visit:
        """Load ``url`` (credentials may be in it), let scripts run for ``budget_ms`` of
        virtual time, and return the DOM plus the response statuses from Chromium's net log."""
        self.visits += 1
        profile = self.directory / f"chromium-{self.visits}"
        netlog = profile.with_suffix(".netlog.json")
        argv = [
            self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
            # Only loopback: other names do not resolve, other requests hit a dead proxy.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1",
            f"--user-data-dir={profile}", f"--log-net-log={netlog}",
            "--window-size=1400,800", "--hide-scrollbars",
            f"--virtual-time-budget={budget_ms}",
            *([f"--screenshot={screenshot}"] if screenshot else []),
            "--dump-dom", url,
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
        return Visit(done.stdout, read_statuses(netlog))


def read_statuses(netlog: Path) -> dict[str, list[int]]:
    """URL -> HTTP status codes received for it, from a Chromium ``--log-net-log`` file."""
    log = json.loads(netlog.read_text())
    names = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    urls: dict[int, str] = {}
    codes: dict[int, list[int]] = {}
    for event in log["events"]:
        kind, params = names.get(event["type"]), event.get("params") or {}
        source = event["source"]["id"]
        if kind == "URL_REQUEST_START_JOB" and "url" in params:
            # Chromium writes "(credentials redacted)" after a URL that carried some.
            urls[source] = params["url"].split(" ")[0].split("?")[0]
        elif kind == "HTTP_TRANSACTION_READ_RESPONSE_HEADERS" and params.get("headers"):
            codes.setdefault(source, []).append(int(params["headers"][0].split()[1]))
    found: dict[str, list[int]] = {}
    for source, url in urls.items():
        found.setdefault(url, []).extend(codes.get(source, []))
    return found


def with_credentials(url: str, user: str, password: str) -> str:
    """``http://user:password@host:port/path`` (percent-encoded)."""
    parts = urllib.parse.urlsplit(url)
    quote = urllib.parse.quote
    return parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}"
                                 f"@{parts.netloc}").geturl()


# --------------------------------------------------------------------------- helpers


def start_default_workers(env: dict[str, str], auth: Path, directory: Path,
                          count: int) -> list[GroupProcess]:
    """Start ``count`` times ``syncer worker --auth FILE -c 2`` with no ``-n``: default node names
    (:func:`node_names` waits for them)."""
    argv = [SYNCER, "worker", "--auth", str(auth), "-c", "2", "--loglevel", "INFO"]
    return [GroupProcess(f"worker{i}", argv, env, directory / f"worker{i}.log").start()
            for i in range(count)]


def node_names(workers: list[GroupProcess]) -> set[str]:
    """Wait until every worker logs ``NODE ready.``; return the node names."""
    return {proc.wait_for_log(rf"({NODE}) ready\.", 30, "ready.").group(1) for proc in workers}


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(150)
def test_flower_pages_show_the_runs_images_and_two_workers(make_registry, redis_server, cluster,
                                                           tmp_path):
    browser = Browser(tmp_path)
    src, dst = make_registry(auth="htpasswd"), make_registry(auth="token")
    pushed = {}
    for i in range(3):
        tag = f"v{i}"
        pushed[tag] = images.push_image(src, SRC_REPO, tag,
                                        layers=[images.make_layer(2000 + 91 * i, seed=tag)])
    auth = write_auth_file(tmp_path / "auth.json", src, dst)
    rules = tmp_path / "images.json"
    rules.write_text(json.dumps({f"{src.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"}))
    pool = cluster(redis_server)
    password = secrets.token_urlsafe(12)
    flower = FlowerProcess(pool.env, pool.directory / "flower.log",
                           basic_auth=("watcher", password))
    workers: list[GroupProcess] = []
    try:
        # Both workers boot while Flower does; Flower counts a worker online from its events.
        workers += start_default_workers(pool.env, auth, pool.directory, 2)
        flower.start()
        nodes = node_names(workers)
        assert len(nodes) == 2, f"two workers on one host share a node name: {nodes}"
        wait_until(lambda: flower.online_workers() >= nodes, 30, "flower to see both workers")

        done = run_syncer(pool.env, "plan", "--auth", str(auth), "--images", str(rules),
                          "--wait", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        run_id = json.loads(done.stdout)["run_id"]
        for tag, image in pushed.items():  # the run really copied every image
            assert images.manifest_digest(dst, DST_REPO, tag) == image.digest
        labels = {f"{src.host}/{SRC_REPO}:{tag} -> {dst.host}/{DST_REPO}:{tag}"
                  for tag in pushed}

        def all_succeeded() -> bool:  # task events reach Flower a moment after the ledger
            tasks = flower.get("/api/tasks").json().values()
            return sum(t["state"] == "SUCCESS" and run_id in (t["args"] or "")
                       for t in tasks) == len(pushed)

        wait_until(all_succeeded, 20, "flower to record every task as succeeded", interval=0.3)

        # The tasks page, as a person sees it.
        shot = tmp_path / "flower-tasks.png"
        tasks = browser.visit(with_credentials(flower.url + "/tasks", "watcher", password),
                              screenshot=shot)
        page = tasks.page
        assert page.columns == COLUMNS, page.columns
        rows = page.records()
        assert {row["args"] for row in rows} == labels, rows
        for row in rows:
            assert row["state"] == "SUCCESS", row
            assert row["kwargs"] == run_id, row
            assert row["worker"] in nodes, row
        assert password not in tasks.dom
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        print(f"screenshot of the tasks page: {shot}")
        assert tasks.statuses[flower.url + "/tasks/datatable"][-1] == 200
        assert not any(tasks.outside().values()), f"answered off loopback: {tasks.outside()}"

        # The workers page: two online workers whose counters add up to the run.
        shown = browser.visit(with_credentials(flower.url + "/workers", "watcher", password))
        page = shown.page
        assert page.by_id["workers-online"] == "2"
        assert page.by_id["workers-succeeded"] == str(len(pushed))
        assert page.by_id["workers-failed"] == "0"
        # Workers table: name, status, active, processed, failed, succeeded, load average.
        table = {row[0]: row for row in page.rows if re.fullmatch(NODE, row[0])}
        assert set(table) == nodes, page.rows
        for row in table.values():
            status, active, processed, failed, succeeded = row[1:6]
            assert status == "Online", row
            assert (active, failed) == ("0", "0") and processed == succeeded, row
        assert sum(int(row[3]) for row in table.values()) == len(pushed)

        # Flower exempts these two from authentication; /metrics names workers, not images.
        assert requests.get(flower.url + "/healthcheck", timeout=10).text == "OK"
        metrics = requests.get(flower.url + "/metrics", timeout=10)
        assert metrics.status_code == 200
        assert all(f'worker="{node}"' in metrics.text for node in nodes)
        for secret_ish in (src.host, dst.host, run_id, SRC_REPO, password):
            assert secret_ish not in metrics.text
    finally:
        for proc in workers:
            proc.stop(grace=5.0)
        flower.stop(grace=5.0)
        for proc in workers:
            print(f"--- {proc.name}:\n{proc.log_text()[-2000:]}")
        print(f"--- flower:\n{flower.log_text()[-2000:]}")


@pytest.mark.timeout(90)
def test_flower_pages_need_the_password(redis_server, cluster, tmp_path):
    browser = Browser(tmp_path)
    pool = cluster(redis_server)
    password = secrets.token_urlsafe(12)
    flower = FlowerProcess(pool.env, pool.directory / "flower.log",
                           basic_auth=("watcher", password))
    try:
        flower.start()
        wrong = ("watcher", "not-" + password)
        for path, credentials in (("/tasks", None), ("/workers", wrong)):
            url = flower.url + path
            visit = browser.visit(with_credentials(url, *credentials) if credentials else url,
                                  budget_ms=2000)
            # Chromium tries once without, then once with the URL's credentials.
            assert set(visit.statuses[url]) == {401}, (path, credentials, visit.statuses)
            assert "syncer" not in visit.dom and "Flower" not in visit.dom, visit.dom[:500]
            assert not any(visit.outside().values()), visit.outside()
        for path in ("/tasks", "/workers", "/api/tasks", "/api/workers", "/broker"):
            assert requests.get(flower.url + path, timeout=10).status_code == 401, path
            assert requests.get(flower.url + path, auth=wrong, timeout=10).status_code == 401
        # ...and the password opens them (so the 401s above are the authentication).
        assert flower.get("/tasks").status_code == 200
    finally:
        flower.stop(grace=5.0)
        print(f"--- flower:\n{flower.log_text()[-2000:]}")
