"""The memory browser (bitmar_browser) over a store that a writer fills while it runs: its JSON API
and pages against what the store holds, the node's own query, safety (escaping, bounds, read-only,
hosts), the command line; then a real headless Chromium driven by Selenium."""

import asyncio
import http.client
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from node_harness import ChildProcess, write_tiny_checkpoint  # noqa: I001  (sets the ROS environment first)
from ros_helpers import REPO, child_env, wait_for

from starlette.requests import Request

from bitmar_browser.app import _read_bounded, _TooLarge, create_app, format_ns, parse_time
from bitmar_browser.cli import ServerThread, default_checkpoint
from bitmar_browser.memory_view import MAX_PAGE_SIZE, MAX_UPLOAD_BYTES, MemoryView, ViewError, effective_slots
from bitmar_core.episodes.service import EpisodicMemoryService
from bitmar_ros.demo import browser_command

T0 = 1_764_950_400_000_000_000  # 2025-12-05 16:00:00 UTC
SCRIPT_CAPTION = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
# (caption, seconds after T0, source, RGB of the frame): stamps out of id order, one shared stamp.
EPISODES = [
    ("a red circle in the middle", 10, "caption", (220, 30, 30)),
    ("a blue square at the top", 30, "caption", (30, 30, 220)),
    ("a giraffe next to a green star", 20, "caption", (230, 200, 40)),
    (SCRIPT_CAPTION, 40, "caption", (30, 200, 30)),
    ("a small purple triangle", 50, "description", (150, 40, 160)),
    ("a large blue circle", 50, "caption", (40, 160, 200)),
    ("an orange oval at the bottom", 60, "caption", (240, 140, 20)),
]
SCREENSHOTS = REPO / "build" / "test-output" / "memory_browser"


def frame(rgb, seed: int) -> np.ndarray:
    """A 120×160 frame of one colour with a darker square, so thumbnails differ in more than colour."""
    img = np.empty((120, 160, 3), np.uint8)
    img[:] = rgb
    y, x = 20 + 7 * seed, 30 + 11 * seed
    img[y:y + 30, x:x + 30] //= 3
    return img


def fill(memory: EpisodicMemoryService) -> dict[str, int]:
    ids = {}
    for i, (caption, seconds, source, rgb) in enumerate(EPISODES):
        ids[caption] = memory.record(caption, T0 + seconds * 10**9, rgb=frame(rgb, i), source=source)
    return ids


class Site:
    """A browser served from a thread over a store that ``writer`` (the node's role) fills."""

    def __init__(self, root: Path, allow_clear: bool = False) -> None:
        self.checkpoint = write_tiny_checkpoint(root / "tiny.safetensors")
        self.store_dir = root / "store"
        self.writer = EpisodicMemoryService.open(self.checkpoint, self.store_dir)
        self.ids = fill(self.writer)
        self.view = MemoryView.open(self.checkpoint, self.store_dir, allow_clear=allow_clear)
        self.server = ServerThread(create_app(self.view)).start()
        self.url = self.server.url.rstrip("/")

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        return request(self.url + path, headers=headers)

    def json(self, path: str, data: bytes | None = None, headers: dict | None = None):
        status, _, body = request(self.url + path, data=data, headers=headers)
        return status, json.loads(body)

    def close(self) -> None:
        self.server.stop()
        self.view.close()
        self.writer.close()


def request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("browser"))
    yield s
    s.close()


def by_time(writer: EpisodicMemoryService) -> list:
    """Every stored episode, newest first (stamp, then id): the timeline's order, worked out here."""
    return sorted(writer.store.all_episodes(), key=lambda e: (e.stamp_ns, e.id), reverse=True)


def png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


# ---------------------------------------------------------------------- API
def test_timeline_is_paged_newest_first(site):
    expected = [e.id for e in by_time(site.writer)]
    got, page = [], 1
    while True:
        status, body = site.json(f"/api/episodes?page={page}&per_page=3")
        assert status == 200 and body["total"] == len(expected) and body["pages"] == -(-len(expected) // 3)
        got += [e["id"] for e in body["episodes"]]
        if page == body["pages"]:
            break
        page += 1
    assert got == expected
    first = site.json("/api/episodes?per_page=1")[1]["episodes"][0]
    newest = by_time(site.writer)[0]
    assert first == {"id": newest.id, "stamp_ns": newest.stamp_ns, "time": "2025-12-05 16:01:00.000 UTC",
                     "caption": newest.caption, "source": newest.source, "robot": None,
                     "thumbnail": f"/thumbnail/{newest.id}.jpg", "url": f"/episode/{newest.id}"}
    for bad in ("per_page=0", f"per_page={MAX_PAGE_SIZE + 1}", "page=0", "page=x", "per_page=-1"):
        status, body = site.json(f"/api/episodes?{bad}")
        assert status == 400 and bad.split("=")[0] in body["error"]


def test_search_runs_the_node_query(site):
    status, body = site.json("/api/search?q=giraffe&k=5")
    assert status == 200
    reference = site.writer.query("giraffe", k=5)  # what the ROS service answers
    assert [h["id"] for h in body["hits"]] == [h.episode.id for h in reference.hits]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in reference.hits])
    top = body["hits"][0]
    assert top["id"] == site.ids[EPISODES[2][0]] and top["matched_by"] == "lexical+embedding"
    assert top["lexical_rank"] == 1 and top["lexical_score"] > 0
    # The cosine shown is the model's query embedding against the stored one.
    q = site.writer.runtime.embed_query("giraffe", None)
    for hit in body["hits"]:
        stored = site.writer.store.episode(hit["id"]).embedding
        assert hit["embedding_score"] == pytest.approx(float(q @ stored / np.linalg.norm(stored)), abs=1e-5)
    # Fused score from the ranks it reports: sum of 1 / (60 + rank).
    assert top["score"] == pytest.approx(1 / (60 + top["lexical_rank"]) + 1 / (60 + top["embedding_rank"]))
    assert body["message"].startswith("5 of 7 episodes")


def test_search_time_window(site):
    start, end = T0 + 20 * 10**9, T0 + 40 * 10**9
    inside = {e.id for e in site.writer.store.all_episodes() if start <= e.stamp_ns <= end}
    for window in (f"start={start}&end={end}", "start=2025-12-05T16:00:20&end=2025-12-05T16:00:40Z",
                   "start=2025-12-05T17:00:20%2B01:00&end=2025-12-05T16:00:40.000"):
        status, body = site.json(f"/api/search?q=circle&k=10&{window}")
        assert status == 200 and {h["id"] for h in body["hits"]} == inside, window
    status, body = site.json("/api/search?q=circle&start=2030-01-01")
    assert status == 200 and body["hits"] == [] and "no episodes in the time window" in body["message"]
    for bad, name in (("start=tomorrow", "start"), (f"start={end}&end={start}", "start"), ("end=1e9", "end"),
                      ("k=51", "k"), ("k=0", "k"), ("", "expected words"), ("q=" + "a" * 2001, "q")):
        status, body = site.json(f"/api/search?{bad}")
        assert status == 400 and name in body["error"], bad


def test_image_search_ranks_by_the_model(site):
    i = 1  # the blue square's frame
    image = frame(EPISODES[i][3], i)
    status, body = site.json("/api/search?k=7", data=png(image), headers={"Content-Type": "image/png"})
    assert status == 200 and len(body["hits"]) == 7
    q = site.writer.runtime.embed_query(None, site.writer.runtime.embed_frame(image))
    cos = {e.id: float(q @ e.embedding / np.linalg.norm(e.embedding)) for e in site.writer.store.all_episodes()}
    assert [h["id"] for h in body["hits"]] == sorted(cos, key=lambda k: (-cos[k], -k))
    for hit in body["hits"]:
        assert hit["matched_by"] == "embedding" and hit["lexical_rank"] == 0
        assert hit["embedding_score"] == pytest.approx(cos[hit["id"]], abs=1e-5)
    # Text and image together: the same fused query as the node's.
    status, body = site.json("/api/search?q=square&k=3", data=png(image), headers={"Content-Type": "image/png"})
    ref = site.writer.query("square", image, k=3)
    assert status == 200 and [h["id"] for h in body["hits"]] == [h.episode.id for h in ref.hits]


def test_uploads_are_bounded(site):
    # Refused on its Content-Length, before the body is read.
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(site.url).netloc, timeout=30)
    conn.putrequest("POST", "/api/search")
    conn.putheader("Content-Length", str(MAX_UPLOAD_BYTES + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and str(MAX_UPLOAD_BYTES) in json.loads(response.read())["error"]
    conn.close()

    # A body without a length (chunked) is cut at the limit as it streams in.
    async def read(chunks: list[bytes], limit: int) -> bytes:
        messages = [{"type": "http.request", "body": c, "more_body": i + 1 < len(chunks)} for i, c in enumerate(chunks)]
        async def receive():
            return messages.pop(0)
        return await _read_bounded(Request({"type": "http", "method": "POST", "headers": []}, receive), limit)

    assert asyncio.run(read([b"ab", b"cd"], 4)) == b"abcd"
    with pytest.raises(_TooLarge, match="at most 4 bytes"):
        asyncio.run(read([b"ab", b"cd", b"e"], 4))
    status, body = site.json("/api/search", data=b"not an image at all")
    assert status == 400 and "image" in body["error"]
    huge = png(np.zeros((5000, 4000, 3), np.uint8))  # 20 MP of zeros compress to a small file
    assert len(huge) < MAX_UPLOAD_BYTES
    status, body = site.json("/api/search", data=huge)
    assert status == 400 and "4000x5000" in body["error"]


def test_captions_are_escaped(site):
    sid = site.ids[SCRIPT_CAPTION]
    for path in ("/", f"/episode/{sid}", f"/episode/{sid - 1}"):
        status, headers, html = site.get(path)
        text = html.decode()
        assert status == 200 and "<script>window.__pwned" not in text and "onerror=" not in text.replace("onerror=&#34;", "")
        assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in text, path
        # Only the page's own script: no inline script can run under this policy either.
        assert re.findall(r"<script[^>]*>", text) == ['<script src="/static/app.js" defer>']
        assert "script-src 'self'" in headers["content-security-policy"]
    # JSON carries the caption as data; the page's script puts it in with textContent only.
    assert site.json(f"/api/episodes/{sid}")[1]["caption"] == SCRIPT_CAPTION
    js = (REPO / "bitmar_browser" / "static" / "app.js").read_text()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_episode_page_and_neighbours_in_time(site):
    order = list(reversed(by_time(site.writer)))  # oldest first
    for pos in (0, 3, len(order) - 1):
        e = order[pos]
        status, body = site.json(f"/api/episodes/{e.id}")
        assert status == 200 and body["caption"] == e.caption
        assert [n["id"] for n in body["older"]] == [o.id for o in reversed(order[max(0, pos - 4):pos])]
        assert [n["id"] for n in body["newer"]] == [o.id for o in order[pos + 1:pos + 5]]
        assert e.id not in [s["id"] for s in body["similar"]] and len(body["similar"]) == 4
    e = order[3]
    status, _, html = site.get(f"/episode/{e.id}")
    assert status == 200 and f'src="/thumbnail/{e.id}.jpg"' in html.decode()
    status, headers, jpeg = site.get(f"/thumbnail/{e.id}.jpg")
    assert status == 200 and headers["content-type"] == "image/jpeg" and jpeg == e.thumbnail_jpeg
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (72, 96, 3)
    assert site.get("/episode/9999")[0] == 404 and site.json("/api/episodes/9999")[0] == 404
    assert site.get("/thumbnail/9999.jpg")[0] == 404


def test_no_request_path_reaches_the_file_system(site):
    for path in ("/static/../cli.py", "/static/..%2fcli.py", "/static/%2e%2e%2fapp.py", "/static/templates%2fbase.html",
                 "/thumbnail/..%2f..%2fepisodes.sqlite3", "/thumbnail/1.jpg/../../etc/passwd", "/episodes.sqlite3"):
        assert site.get(path)[0] == 404, path
    status, headers, js = site.get("/static/app.js")
    assert status == 200 and js == (REPO / "bitmar_browser" / "static" / "app.js").read_bytes()


def test_only_loopback_host_names_are_served(site):
    assert site.get("/api/stats", headers={"Host": "attacker.example"})[0] == 400  # DNS rebinding
    for host in ("127.0.0.1", "localhost"):
        assert site.get("/api/stats", headers={"Host": f"{host}:1234"})[0] == 200


def test_read_only_by_default(site):
    db = site.store_dir / "episodes.sqlite3"
    assert site.view.store.read_only
    status, body = site.json("/api/clear", data=b'{"confirm": true}', headers={"Content-Type": "application/json"})
    assert status == 403 and "--allow-clear" in body["error"]
    assert site.writer.count() == len(EPISODES) or site.writer.count() > len(EPISODES)
    assert "Clear memory" not in site.get("/")[2].decode() and db.exists()


def test_stats_and_pictures_follow_a_live_writer(site):
    status, s = site.json("/api/stats")
    n = site.writer.count()
    state = site.writer.runtime.memory_state()
    K, C = state["memory"].shape
    assert status == 200 and (s["episodes"], s["memory_writes"], s["slots"], s["slot_dim"]) == (n, n, K, C)
    assert s["slots_used"] == int((state["usage"] > s["used_slot_usage"]).sum()) and s["writable"] is False
    share = state["usage"].astype(np.float64) / state["usage"].sum()
    assert s["effective_slots"] == pytest.approx(np.exp(-(share * np.log(share)).sum()))
    assert effective_slots(np.ones(8)) == pytest.approx(8) and effective_slots(np.eye(1, 8)[0]) == pytest.approx(1)
    assert effective_slots(np.zeros(8)) is None
    assert (s["newest_time"], s["oldest_time"]) == (format_ns(T0 + 60 * 10**9), format_ns(T0 + 10 * 10**9))
    # The writer (a node) commits an episode while the browser is open: the next poll shows it.
    new_id = site.writer.record("a zebra in the corner", T0 + 70 * 10**9, rgb=frame((90, 90, 90), 0))
    status, s2 = site.json("/api/stats")
    assert (s2["episodes"], s2["memory_writes"]) == (n + 1, n + 1) and s2["version"] != s["version"]
    assert site.json("/api/search?q=zebra&k=1")[1]["hits"][0]["id"] == new_id
    assert site.json("/api/episodes?per_page=1")[1]["episodes"][0]["id"] == new_id
    # Heat map of M: column j (×sx) is slot j, row c (×2) is channel c; sign → red or blue, the
    # largest magnitude → the colour's full value.
    M = site.writer.runtime.memory_state()["memory"]
    status, headers, body = site.get("/memory.png")
    pic = cv2.cvtColor(cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    sx = -(-512 // K)
    assert status == 200 and pic.shape == (2 * C, sx * K, 3)
    j, c = np.unravel_index(np.abs(M).argmax(), M.shape)
    assert tuple(pic[2 * c, sx * j]) == ((178, 24, 43) if M[j, c] > 0 else (33, 102, 172))
    red = pic[::2, ::sx, 0].astype(int) > pic[::2, ::sx, 2].astype(int)
    big = np.abs(M.T) > 0.05 * np.abs(M).max()
    assert np.array_equal(red[big], (M.T > 0)[big])
    usage = site.writer.runtime.memory_state()["usage"]
    strip = cv2.cvtColor(cv2.imdecode(np.frombuffer(site.get("/usage.png")[2], np.uint8), cv2.IMREAD_COLOR),
                         cv2.COLOR_BGR2RGB)
    assert strip.shape == (24, sx * K, 3) and tuple(strip[0, sx * int(usage.argmax())]) == (178, 24, 43)


def test_clear_needs_the_flag_the_token_and_a_confirmation(tmp_path):
    site = Site(tmp_path, allow_clear=True)
    try:
        site.writer.close()  # a store no node is writing
        html = site.get("/")[2].decode()
        token = re.search(r'<meta name="bitmar-token" content="([^"]+)">', html).group(1)
        assert 'id="clear-memory"' in html
        json_type = {"Content-Type": "application/json"}
        assert site.json("/api/clear", data=b'{"confirm": true}', headers=json_type)[0] == 403
        status, body = site.json("/api/clear", data=b'{"confirm": "yes"}', headers={**json_type, "X-Bitmar-Token": token})
        assert status == 400 and "confirm" in body["error"]
        status, body = site.json("/api/clear", data=b'{"confirm": true}', headers={**json_type, "X-Bitmar-Token": token})
        assert (status, body) == (200, {"forgotten": len(EPISODES)})
        s = site.json("/api/stats")[1]
        assert (s["episodes"], s["memory_writes"]) == (0, None)
        assert site.json("/api/episodes")[1]["episodes"] == []
        reopened = EpisodicMemoryService.open(site.checkpoint, site.store_dir)
        try:
            assert reopened.count() == 0 and reopened.runtime.memory_writes == 0
        finally:
            reopened.close()
    finally:
        site.server.stop()
        site.view.close()


def test_time_parsing():
    assert parse_time("start", "") is None and parse_time("start", "123") == 123
    assert parse_time("start", "1970-01-01T00:00:01.5") == 1_500_000_000
    assert parse_time("start", "2025-12-05T17:00:00+01:00") == T0
    with pytest.raises(ViewError, match="end: expected"):
        parse_time("end", "1969-12-31T23:59:59")
    assert format_ns(T0 + 1_234_567_890) == "2025-12-05 16:00:01.234 UTC"


def test_default_checkpoint_is_the_bundled_one():
    assert default_checkpoint().name == "bitmar_default.safetensors" and default_checkpoint().is_file()


@pytest.mark.slow
def test_command_line(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    writer = EpisodicMemoryService.open(checkpoint, tmp_path / "store")
    writer.record("a red circle", T0, rgb=frame((200, 0, 0), 0))
    proc = ChildProcess([sys.executable, str(REPO / "bin" / "bitmar_memory_browser"), "--store", str(tmp_path / "store"),
                         "--checkpoint", str(checkpoint), "--port", "0"])
    try:
        wait_for(lambda: any("open http" in line for line in proc.lines) or proc.proc.poll() is not None,
                 timeout_s=60, what="the browser to start")
        url = re.search(r"open (http://\S+)", "\n".join(proc.lines)).group(1)
        assert url.startswith("http://127.0.0.1:") and "1 episodes" in proc.lines[0] and "read-only" in proc.lines[0]
        assert json.loads(request(url + "api/stats")[2])["episodes"] == 1
        writer.record("a blue square", T0 + 1, rgb=frame((0, 0, 200), 1))  # the node writes beside it
        assert json.loads(request(url + "api/stats")[2])["episodes"] == 2
        proc.proc.send_signal(signal.SIGINT)
        assert proc.proc.wait(timeout=30) == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
        writer.close()
    # The command the demo prints (python -m), and an error that names the input.
    command = shlex.split(browser_command(tmp_path / "none", str(checkpoint)))
    assert command[:3] == [sys.executable, "-m", "bitmar_browser"]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120, env=child_env())
    assert run.returncode == 2 and str(tmp_path / "none") in run.stderr and "no episode store" in run.stderr
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------- a real browser
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


def chromium_driver(profile: Path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Chromium is not installed (scripts/setup.sh installs Debian's chromium and chromium-driver "
                    "with apt when it runs as root; it could not here)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1100", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path is given: Selenium Manager never tries to download one.
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def mean_rgb_of(driver, img) -> np.ndarray:
    """The mean colour of an <img> as the browser decoded it (drawn into a canvas)."""
    return np.array(driver.execute_script("""
        const img = arguments[0], c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data; const s = [0, 0, 0];
        for (let i = 0; i < d.length; i += 4) { s[0] += d[i]; s[1] += d[i + 1]; s[2] += d[i + 2]; }
        return s.map(v => v / (d.length / 4));""", img))


@pytest.mark.slow
def test_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    site = Site(tmp_path / "site")
    driver = chromium_driver(tmp_path / "chromium-profile")
    wait = WebDriverWait(driver, 20)

    def shot(name: str) -> None:
        driver.save_screenshot(str(SCREENSHOTS / name))

    try:
        driver.get(site.url + "/")
        wait.until(lambda d: d.find_element(By.ID, "stat-episodes").text == str(len(EPISODES)))
        wait.until(lambda d: d.execute_script("return document.getElementById('memory-map').naturalWidth > 0"))
        cards = driver.find_elements(By.CSS_SELECTOR, "#timeline li.card")
        assert [int(c.get_attribute("data-episode-id")) for c in cards] == [e.id for e in by_time(site.writer)]
        # The <script> caption is text on the page, and nothing of it ran.
        sid = site.ids[SCRIPT_CAPTION]
        card = driver.find_element(By.CSS_SELECTOR, f'#timeline li[data-episode-id="{sid}"] .caption')
        assert card.text == SCRIPT_CAPTION
        assert driver.execute_script("return window.__pwned") is None
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1
        shot("timeline.png")

        def search(text: str | None = None, image: Path | None = None) -> list:
            """Fill the form, press Search, wait for the page to render the answer; the result cards."""
            box = driver.find_element(By.ID, "search-text")
            box.clear()
            if text:
                box.send_keys(text)
            if image:
                driver.find_element(By.ID, "search-image").send_keys(str(image))
            done = driver.find_element(By.TAG_NAME, "body").get_attribute("data-searched")
            driver.find_element(By.ID, "search-button").click()
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searched") != done)
            return driver.find_elements(By.CSS_SELECTOR, "#results li.result")

        # Search for a caption word: the giraffe's thumbnail comes first.
        search("giraffe")
        first = driver.find_element(By.CSS_SELECTOR, "#results li.result")
        gid = site.ids[EPISODES[2][0]]
        assert int(first.get_attribute("data-episode-id")) == gid
        assert "giraffe" in first.find_element(By.CLASS_NAME, "caption").text
        assert "lexical+embedding" in first.find_element(By.CLASS_NAME, "score").text
        img = first.find_element(By.CSS_SELECTOR, "img.thumb")
        assert img.get_attribute("src").endswith(f"/thumbnail/{gid}.jpg")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img))
        shown = mean_rgb_of(driver, img)
        stored = cv2.imdecode(np.frombuffer(site.writer.store.episode(gid).thumbnail_jpeg, np.uint8),
                              cv2.IMREAD_COLOR)[..., ::-1].reshape(-1, 3).mean(axis=0)
        assert np.abs(shown - stored).max() < 3, (shown, stored)
        shot("search_giraffe.png")

        # A search that finds the <script> caption shows it as text too.
        assert search("script pwned")[0].get_attribute("data-episode-id") == str(sid)
        assert driver.find_element(By.CSS_SELECTOR, "#results li.result .caption").text == SCRIPT_CAPTION
        assert driver.execute_script("return window.__pwned") is None
        assert len(driver.find_elements(By.TAG_NAME, "script")) == 1

        # Search by an uploaded image: the results the API gives for the same file.
        query_png = tmp_path / "query.png"
        query_png.write_bytes(png(frame(EPISODES[1][3], 1)))
        shown = search(image=query_png)
        api = site.json("/api/search?k=10", data=query_png.read_bytes(), headers={"Content-Type": "image/png"})[1]
        shown_ids = [int(li.get_attribute("data-episode-id")) for li in shown]
        assert shown_ids == [h["id"] for h in api["hits"]]
        shot("search_image.png")

        # A node writes while the page is open: the statistics follow without a reload.
        version = driver.find_element(By.TAG_NAME, "body").get_attribute("data-stats-version")
        site.writer.record("a zebra in the corner", T0 + 70 * 10**9, rgb=frame((90, 90, 90), 0))
        wait.until(lambda d: d.find_element(By.ID, "stat-episodes").text == str(len(EPISODES) + 1))
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-stats-version") != version)
        assert driver.find_element(By.ID, "stat-writes").text == str(len(EPISODES) + 1)
        assert driver.find_element(By.ID, "new-episodes").is_displayed()
        shot("live_update.png")

        # The episode page: the full thumbnail, the caption, neighbours in time.
        driver.find_element(By.CSS_SELECTOR, f'#timeline li[data-episode-id="{gid}"] a').click()
        wait.until(ec.presence_of_element_located((By.ID, "episode")))
        assert driver.find_element(By.CSS_SELECTOR, "#episode .caption").text == EPISODES[2][0]
        full = driver.find_element(By.CSS_SELECTOR, "#episode img.full")
        wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", full) == 96)
        older = [a.text for a in driver.find_elements(By.CSS_SELECTOR, ".strip.older .caption")]
        newer = [a.text for a in driver.find_elements(By.CSS_SELECTOR, ".strip.newer .caption")]
        assert older == [EPISODES[0][0]] and newer[:2] == [EPISODES[1][0], SCRIPT_CAPTION]
        assert driver.execute_script("return window.__pwned") is None
        shot("episode.png")

        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
        site.close()
    print(f"\nmemory browser screenshots: {SCREENSHOTS}")
