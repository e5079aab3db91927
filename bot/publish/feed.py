"""The leaderboard feed: one record per evaluated candidate, published or not.

Records go to a dataset repo on the Hub (`<org>/safeguard-results`, `results.jsonl`, appended
with parent_commit and retried on conflict, so concurrent runners lose nothing; bot/hub.py) and
to local files: `results.jsonl` (appended), `feed.atom` and `leaderboard.html` (regenerated
from all records). Every string from outside is escaped by the XML writer or by Jinja's HTML
autoescape.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

if TYPE_CHECKING:
    from bot.config import PublishSettings

RESULTS_FILE = "results.jsonl"
COLUMNS = [("repo", "fine-tune"), ("base", "base"), ("decision", "decision"),
           ("weight", "lambda"), ("asr_finetune", "ASR fine-tune"),
           ("asr_merged", "ASR merged"), ("asr_base", "ASR base"),
           ("over_refusal_merged", "over-refusal"), ("retention", "task retention"),
           ("time", "time")]


@dataclass(frozen=True)
class FeedRecord:
    repo: str
    revision: str
    base: str
    # pull-request | variant | feed-only | no-publish | declined | skipped | failed
    decision: str
    reason: str
    method: str | None = None
    weight: float | None = None
    asr_base: float | None = None
    asr_finetune: float | None = None
    asr_merged: float | None = None
    over_refusal_base: float | None = None
    over_refusal_merged: float | None = None
    task_base: float | None = None
    task_finetune: float | None = None
    task_merged: float | None = None
    retention: float | None = None
    links: dict[str, str] = field(default_factory=dict)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def record(repo: str, revision: str, base: str, decision: str, reason: str, report=None,
           links: dict[str, str] | None = None) -> FeedRecord:
    """A record from a sweep report (or none, for skips and failures)."""
    if report is None:
        return FeedRecord(repo, revision, base, decision, reason, links=links or {})
    chosen = next((p for p in report.points if p.weight == report.selection.weight), None)
    return FeedRecord(
        repo, revision, base, decision, reason, method=report.method,
        weight=report.selection.weight, asr_base=report.base_point.asr,
        asr_finetune=report.finetune_point.asr, asr_merged=chosen.asr if chosen else None,
        over_refusal_base=report.base_point.over_refusal,
        over_refusal_merged=chosen.over_refusal if chosen else None,
        task_base=report.base_point.task, task_finetune=report.finetune_point.task,
        task_merged=chosen.task if chosen else None,
        retention=chosen.retention if chosen else None, links=links or {})


def record_key(line: str) -> str:
    """What makes a record unique: the candidate's revision and its decision. A run that was
    killed after pushing and then retried must not add the same result twice."""
    try:
        row = json.loads(line)
        return f"{row['repo']}@{row['revision']}:{row['decision']}"
    except (json.JSONDecodeError, KeyError, TypeError):
        return line


def results_repo(settings: PublishSettings) -> str:
    """The results dataset: publish.feed_repo, else OWNER/safeguard-results, OWNER being
    publish.variant_owner or the account HF_TOKEN belongs to."""
    from bot import hub

    return settings.feed_repo or \
        f"{settings.variant_owner or hub.whoami()}/safeguard-results"


def push(records: list[FeedRecord], dataset_repo: str) -> str | None:
    """Append the new records to the Hub dataset's results.jsonl; the commit's sha, or None
    when every record was there already."""
    return push_lines([r.to_json() for r in records], dataset_repo)


def push_lines(lines: list[str], dataset_repo: str) -> str | None:
    """`push` for records already written as JSON lines (those the ledger kept pending)."""
    from bot import hub

    return hub.append_lines(dataset_repo, RESULTS_FILE, lines,
                            f"safeguard-bot: {len(lines)} result(s)", key=record_key)


def from_json(line: str) -> FeedRecord:
    """A record from its JSON line."""
    return FeedRecord(**json.loads(line))


def write_local(records: list[FeedRecord], directory: Path,
                templates_dir: str | None = None) -> dict[str, Path]:
    """Append to directory/results.jsonl, then regenerate the Atom feed and the leaderboard
    (from `templates_dir`'s leaderboard.html.j2 if it has one, else the bot's)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    results = directory / RESULTS_FILE
    present = {record_key(json.dumps(r)) for r in read_local(directory)}
    with results.open("a", encoding="utf-8") as f:
        f.writelines(r.to_json() + "\n" for r in records
                     if record_key(r.to_json()) not in present)
        f.flush()
        os.fsync(f.fileno())
    rows = read_local(directory)
    return {"results": results, "atom": _write(directory / "feed.atom", atom(rows)),
            "leaderboard": _write(directory / "leaderboard.html",
                                  leaderboard(rows, templates_dir))}


def read_local(directory: Path) -> list[dict]:
    path = Path(directory) / RESULTS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None  # a torn or corrupt line: skipped, the rest still counts
        if isinstance(row, dict) and {"repo", "revision", "decision", "time"} <= set(row):
            rows.append(row)
    return rows


def _xml_text(value: object) -> str:
    """A value as text XML 1.0 can hold: control characters (but tab and new line) dropped."""
    return re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]", "", str(value))


def atom(rows: list[dict], feed_id: str = "urn:safeguard-bot:results") -> str:
    """An Atom feed, newest first (the XML writer escapes every value)."""
    ns = "http://www.w3.org/2005/Atom"
    ET.register_namespace("", ns)
    feed = ET.Element(f"{{{ns}}}feed")
    ET.SubElement(feed, f"{{{ns}}}title").text = "safeguard-bot results"
    ET.SubElement(feed, f"{{{ns}}}id").text = feed_id
    newest = max((r["time"] for r in rows), default=datetime.now(UTC).isoformat())
    ET.SubElement(feed, f"{{{ns}}}updated").text = newest
    author = ET.SubElement(feed, f"{{{ns}}}author")
    ET.SubElement(author, f"{{{ns}}}name").text = "safeguard-bot"
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["time"], i), reverse=True)
    for r in (rows[i] for i in order):  # newest first; same second: later record first
        entry = ET.SubElement(feed, f"{{{ns}}}entry")
        ET.SubElement(entry, f"{{{ns}}}title").text = _xml_text(f"{r['repo']}: {r['decision']}")
        ET.SubElement(entry, f"{{{ns}}}id").text = _xml_text(f"{feed_id}:{r['repo']}@"
                                                             f"{r['revision']}")
        ET.SubElement(entry, f"{{{ns}}}updated").text = _xml_text(r["time"])
        ET.SubElement(entry, f"{{{ns}}}summary").text = _xml_text(r["reason"])
        for rel, href in sorted(r.get("links", {}).items()):
            if not (isinstance(href, str) and href.startswith(("https://", "http://"))):
                continue
            ET.SubElement(entry, f"{{{ns}}}link", {"rel": "related", "title": rel,
                                                   "href": href})
    return ET.tostring(feed, encoding="unicode", xml_declaration=True) + "\n"


def leaderboard(rows: list[dict], templates_dir: str | None = None) -> str:
    """A static HTML page, a table sortable by any column (templates/leaderboard.html.j2)."""
    from bot.publish.templates import render

    latest: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["time"]):
        latest[r["repo"]] = r  # the newest record per repo
    ordered = sorted(latest.values(), key=lambda r: (r.get("asr_merged") is None,
                                                     r.get("asr_merged") or 0))
    table = [{"cells": ["" if r.get(key) is None else _xml_text(r[key]) if isinstance(r[key], str)
                        else r[key] for key, _ in COLUMNS],
              "href": _safe_link(r.get("links", {}))} for r in ordered]
    return render("leaderboard.html.j2", templates_dir, headers=[h for _, h in COLUMNS],
                  rows=table, generated=datetime.now(UTC).isoformat(timespec="seconds"))


def _safe_link(links: dict) -> str | None:
    """The record's pull request or variant link, only if it is plain http(s)."""
    for key in ("pull_request", "variant", "repo"):
        href = links.get(key)
        if isinstance(href, str) and href.startswith(("https://", "http://")):
            return href
    return None


def _write(path: Path, text: str) -> Path:
    """Atomically: a temporary file of this writer's own, then a rename (concurrent workers
    sharing a feed folder each write whole files)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
