"""feed.py: records from a real sweep, the local files (JSONL, Atom, leaderboard), hostile text,
concurrent runners appending to one Hub dataset, and the leaderboard in a real headless browser."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from huggingface_hub import hf_hub_download

from bot.config import load_settings
from bot.publish import feed
from bot.stages import sweep_refs as run_sweep

from conftest import sweet_spot

ROOT = Path(__file__).resolve().parent.parent
ATOM = "{http://www.w3.org/2005/Atom}"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Hostile data: if any of it were rendered as markup, the script would mark the page.
PWN = "document.documentElement.setAttribute('data-pwned','1')"
HOSTILE_REPO = f'evil/<script>{PWN}</script>"&<img src=x onerror="{PWN}">'
HOSTILE_REASON = f'<b>bold</b> & "quoted" <script>{PWN}</script>'
HOSTILE_LINK = f"javascript:{PWN}"


def rec(repo: str, time_: str, asr_merged: float | None, links=None, reason="ok",
        decision="variant", **more) -> feed.FeedRecord:
    return feed.FeedRecord(repo, "a" * 40, "org/base-it", decision, reason,
                           asr_merged=asr_merged, links=links or {}, time=time_, **more)


# --- records from a real sweep ---------------------------------------------------------------

@pytest.fixture(scope="module")
def echo_sweep(zoo):
    """One small sweep of the zoo's echo fine-tune (at its sweet spot, 16 prompts per set)."""
    directory, built = zoo
    settings = load_settings(ROOT / "bot" / "zoo" / "evaluate.toml", [
        f"evaluate.task_file={directory / 'prompts' / 'echo_heldout.jsonl'}",
        f"sweep.grid=[{sweet_spot(built, 'zoo-ft-echo')}]",
        "evaluate.limit=16"])
    return run_sweep(str(directory / "zoo-base-it"), str(directory / "zoo-ft-echo"), settings)


def test_a_record_carries_the_sweeps_numbers(echo_sweep):
    report = echo_sweep
    assert report.selection.publish and report.selection.weight == report.points[0].weight, \
        report.selection
    chosen = report.points[0]
    links = {"variant": "http://127.0.0.1/x/y"}
    r = feed.record("carol/zoo-ft-echo", "b" * 40, "safeguard/zoo-base-it", "variant",
                    report.selection.reason, report, links)
    assert (r.repo, r.revision, r.base, r.decision, r.method, r.links) == (
        "carol/zoo-ft-echo", "b" * 40, "safeguard/zoo-base-it", "variant", "linear", links)
    assert r.reason == report.selection.reason
    assert r.weight == report.points[0].weight
    assert (r.asr_base, r.asr_finetune, r.asr_merged) == (
        report.base_point.asr, report.finetune_point.asr, chosen.asr)
    assert (r.over_refusal_base, r.over_refusal_merged) == (
        report.base_point.over_refusal, chosen.over_refusal)
    assert (r.task_base, r.task_finetune, r.task_merged) == (
        report.base_point.task, report.finetune_point.task, chosen.task)
    assert r.retention == chosen.retention
    assert r.asr_merged < r.asr_finetune  # the point of it all
    assert json.loads(r.to_json())["asr_merged"] == chosen.asr
    # without a report (a skip or a failure): no numbers
    bare = feed.record("carol/x", "c" * 40, "b/base", "failed", "boom")
    assert bare.weight is None and bare.asr_merged is None and bare.links == {}


# --- local files ------------------------------------------------------------------------------

def test_write_local_appends_and_the_atom_is_newest_first(tmp_path):
    first = [rec("org/one", "2025-01-01T00:00:01+00:00", 0.1),
             rec("org/two", "2025-01-01T00:00:02+00:00", 0.2)]
    second = [rec("org/three", "2025-01-01T00:00:03+00:00", None, decision="no-publish")]
    feed.write_local(first, tmp_path)
    paths = feed.write_local(second, tmp_path)
    lines = paths["results"].read_text().splitlines()
    assert [json.loads(x)["repo"] for x in lines] == ["org/one", "org/two", "org/three"]
    assert feed.read_local(tmp_path) == [json.loads(x) for x in lines]
    root = ET.parse(paths["atom"]).getroot()
    assert root.tag == f"{ATOM}feed"
    entries = root.findall(f"{ATOM}entry")
    assert [e.findtext(f"{ATOM}title") for e in entries] == [
        "org/three: no-publish", "org/two: variant", "org/one: variant"]
    assert root.findtext(f"{ATOM}updated") == "2025-01-01T00:00:03+00:00"
    assert len({e.findtext(f"{ATOM}id") for e in entries}) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_hostile_strings_are_escaped_and_javascript_links_dropped(tmp_path):
    hostile = rec(HOSTILE_REPO, "2025-01-01T00:00:05+00:00", 0.3, reason=HOSTILE_REASON,
                  links={"variant": HOSTILE_LINK, "pull_request": "JavaScript:alert(1)",
                         "commit": " javascript:alert(2)", "repo": "data:text/html,<b>x</b>"})
    fine = rec("org/fine", "2025-01-01T00:00:04+00:00", 0.1,
               links={"variant": "https://hub.example/org/fine-safeguarded"})
    paths = feed.write_local([fine, hostile], tmp_path)

    # Atom: well-formed, the hostile text comes back as text, no link but http(s)
    root = ET.parse(paths["atom"]).getroot()
    entries = {e.findtext(f"{ATOM}title"): e for e in root.findall(f"{ATOM}entry")}
    evil = entries[f"{HOSTILE_REPO}: variant"]
    assert evil.findtext(f"{ATOM}summary") == HOSTILE_REASON
    assert evil.findall(f"{ATOM}link") == []
    good = entries["org/fine: variant"].findall(f"{ATOM}link")
    assert [a.get("href") for a in good] == ["https://hub.example/org/fine-safeguarded"]
    raw_atom = paths["atom"].read_text()
    assert "<script" not in raw_atom and "<b>" not in raw_atom and "javascript:" not in raw_atom

    # HTML: no markup from the data; the repo's text survives as text
    html = paths["leaderboard"].read_text()
    assert "<script>document" not in html and "<img" not in html and "<b>" not in html
    assert "javascript:" not in html.lower() and "data:text" not in html
    assert "&lt;script&gt;" in html and "&amp;" in html and "&#34;" in html
    page = _Table()
    page.feed(html)
    assert HOSTILE_REPO in [row[0] for row in page.rows if row]
    assert page.hrefs == ["https://hub.example/org/fine-safeguarded"]
    assert page.scripts == 1  # the page's own sorting script, nothing else


class _Table(HTMLParser):
    """The leaderboard's rows (cell texts), its links and how many script elements it has."""

    def __init__(self):
        super().__init__()
        self.rows, self.hrefs, self.scripts, self._cell = [], [], 0, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._cell = ""
        elif tag == "a":
            self.hrefs.append(dict(attrs)["href"])
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


# --- concurrent runners -----------------------------------------------------------------------

PUSHER = """
import os, sys, time
from pathlib import Path
from bot.publish import feed
me, go, repo = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
Path(go.parent / f"ready-{me}").touch()
while not go.exists():
    time.sleep(0.005)
for i in range(5):
    feed.push([feed.record(f"runner{me}/model-{i}", "a" * 40, "org/base", "variant", "ok")],
              repo)
print("done", me)
"""


def test_concurrent_runners_lose_nothing(localhub, tmp_path):
    """4 processes push 5 records each to one dataset at once: all 20 lines, each once."""
    localhub.add_user("feed-runner", "hf_feed_runner_token")
    repo = "feed-runner/concurrent-results"
    env = {**os.environ, **localhub.env("hf_feed_runner_token"),
           "HF_HOME": str(tmp_path / "hf-home")}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, str(k), str(go), repo], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in range(4)]
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < 4:
            assert time.monotonic() < deadline, "the pushers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        go.touch()  # all at once
        outcomes = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outcomes, strict=True):
        assert p.returncode == 0, err[-3000:]
    path = hf_hub_download(repo, feed.RESULTS_FILE, repo_type="dataset", endpoint=localhub.url,
                           cache_dir=tmp_path / "check")
    lines = Path(path).read_text().splitlines()
    repos = [json.loads(line)["repo"] for line in lines]
    assert len(repos) == 20 and sorted(repos) == sorted(
        f"runner{k}/model-{i}" for k in range(4) for i in range(5))


# --- the leaderboard in a real browser --------------------------------------------------------

def _chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


PROBE = """<script>
(() => {
  const order = () => Array.from(document.querySelectorAll("#leaderboard tbody tr"))
    .map(tr => tr.cells[0].textContent.trim());
  const th = Array.from(document.querySelectorAll("#leaderboard th"))
    .find(h => h.textContent.trim() === "ASR merged");
  document.body.setAttribute("data-initial", JSON.stringify(order()));
  th.click();
  document.body.setAttribute("data-order1", JSON.stringify(order()));
  document.body.setAttribute("data-sort1", th.getAttribute("aria-sort"));
  th.click();
  document.body.setAttribute("data-order2", JSON.stringify(order()));
  document.body.setAttribute("data-sort2", th.getAttribute("aria-sort"));
})();
</script>
"""


def test_the_leaderboard_sorts_in_a_real_browser(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(f"no headless browser: none of {', '.join(CHROMIUM_NAMES)} is on PATH "
                    "(.ci/run installs Debian's chromium)")
    asr = {"org/alpha": 0.3, "org/beta": 0.05, "org/gamma": 0.5, "org/delta": 0.125,
           HOSTILE_REPO: 0.2, "org/epsilon": 0.0}
    records = [rec(repo, f"2025-01-01T00:00:{10 + i:02d}+00:00", value,
                   reason=HOSTILE_REASON,
                   links={"variant": HOSTILE_LINK if repo == HOSTILE_REPO
                          else f"https://hub.example/{repo}-safeguarded"})
               for i, (repo, value) in enumerate(asr.items())]
    records.append(rec("org/unmeasured", "2025-01-01T00:00:30+00:00", None,
                       decision="failed"))
    page = feed.write_local(records, tmp_path / "site")["leaderboard"]
    html = page.read_text()
    assert html.count("</body>") == 1
    probe = tmp_path / "site" / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))

    dom = _dump_dom(browser, probe, tmp_path)
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:2000]
    attrs = dict(_Attrs.of(body.group(0)))
    assert "data-order2" in attrs, f"the probe did not run: {body.group(0)[:500]}"
    html_tag = re.search(r"<html[^>]*>", dom).group(0)
    assert "data-pwned" not in dict(_Attrs.of(html_tag)), html_tag  # no script from the data ran
    initial = json.loads(attrs["data-initial"])
    once, twice = json.loads(attrs["data-order1"]), json.loads(attrs["data-order2"])
    everyone = [*asr, "org/unmeasured"]
    assert sorted(initial) == sorted(once) == sorted(twice) == sorted(everyone)
    measured = sorted(asr, key=asr.get)
    # one click: ascending by ASR merged (the empty cell last); a second click: descending
    assert attrs["data-sort1"] == "ascending" and once == [*measured, "org/unmeasured"]
    assert attrs["data-sort2"] == "descending" and twice == [*measured[::-1], "org/unmeasured"]
    page_after = _Table()
    page_after.feed(dom)
    assert HOSTILE_REPO in [row[0] for row in page_after.rows if row]
    assert all(h.startswith("https://hub.example/") for h in page_after.hrefs)
    assert page_after.scripts == 2  # the page's and the probe's


class _Attrs(HTMLParser):
    """The attributes of one start tag."""

    @classmethod
    def of(cls, tag: str) -> list[tuple[str, str | None]]:
        parser = cls()
        parser.attrs = []
        parser.feed(tag)
        return parser.attrs

    def handle_starttag(self, tag, attrs):
        self.attrs = attrs


def _dump_dom(browser: str, page: Path, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran, from headless chromium."""
    profile = tmp_path / "chromium-profile"
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--dump-dom", page.as_uri()]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "HOME": str(tmp_path)})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"chromium did not finish in 60 s: {e.stderr!r}"[:3000])
    assert out.returncode == 0 and "<body" in out.stdout, \
        f"chromium failed ({out.returncode}): {out.stderr[-3000:]}"
    return out.stdout
