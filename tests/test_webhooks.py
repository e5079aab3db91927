"""`serve-webhooks`: real HTTP on loopback, the ledger it fills, the CLI process, and a webhook
for a fine-tune seeded on the local hub that the worker's claim then picks up."""

import hashlib
import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
from huggingface_hub import HfApi

from bot.config import load_settings
from bot.discovery import Candidate, candidate_for
from bot.errors import UsageError
from bot.ledger import Ledger
from bot.webhooks import SECRET_ENV, WebhookServer, resolve_secret
from bot.zoo.seed import card, upload

SECRET = "wh-test-secret-0123456789"


def sha(n: object) -> str:
    return hashlib.sha1(str(n).encode()).hexdigest()


def payload(repo: str, revision: str | None, scope: str = "repo.content",
            action: str = "update", kind: str = "model", refs: list | None = None) -> dict:
    """A payload as the Hub sends it (https://huggingface.co/docs/hub/webhooks)."""
    body = {"event": {"action": action, "scope": scope},
            "repo": {"type": kind, "name": repo, "id": "6366c000a2abcdf2fd69a080",
                     "private": False, "owner": {"id": "61d2000c3c2083e1c08af22d"},
                     "url": {"web": f"https://huggingface.co/{repo}",
                             "api": f"https://huggingface.co/api/models/{repo}"},
                     "tags": ["license:apache-2.0"]},
            "webhook": {"id": "6390e855e30d9209411de93b", "version": 3}}
    if revision is not None:
        body["repo"]["headSha"] = revision
    if scope == "repo.content":
        body["updatedRefs"] = refs if refs is not None else [
            {"ref": "refs/heads/main", "oldSha": sha("old"), "newSha": revision}]
    return body


def request(url: str, body: object = None, secret: str | None = SECRET, method: str = "POST",
            path: str | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers); a dict body is sent as JSON, bytes as they are."""
    parts = urlsplit(url)
    data = json.dumps(body).encode() if isinstance(body, dict | list) else body
    sent = {"Content-Type": "application/json", **(headers or {})}
    if secret is not None:
        sent["X-Webhook-Secret"] = secret
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path or parts.path, body=data, headers=sent)
        reply = conn.getresponse()
        raw = reply.read()
        return reply.status, json.loads(raw) if raw else {}, dict(reply.getheaders())
    finally:
        conn.close()


@pytest.fixture
def served(tmp_path):
    """A WebhookServer on a free port over tmp_path's ledger: (server, ledger, log lines)."""
    lines: list[str] = []
    settings = load_settings(None, [])
    server = WebhookServer(settings, tmp_path, SECRET, port=0, log=lines.append).start()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        yield server, ledger, lines
    finally:
        server.stop()
        ledger.close()


def test_a_model_update_is_queued_once(served):
    server, ledger, lines = served
    body = payload("bob/wh-ft", sha(1))
    assert request(server.url, body)[:2] == (
        202, {"queued": True, "repo": "bob/wh-ft", "revision": sha(1)})
    [entry] = ledger.entries()
    assert (entry.repo, entry.revision, entry.status, entry.kind, entry.base, entry.attempts) \
        == ("bob/wh-ft", sha(1), "queued", "model", None, 0)
    # the Hub replays it: nothing changes
    assert request(server.url, body)[:2] == (
        202, {"queued": False, "repo": "bob/wh-ft", "revision": sha(1)})
    assert ledger.entries() == [entry]
    # a new revision is a new entry; a repo-level create counts too
    assert request(server.url, payload("bob/wh-ft", sha(2), scope="repo", action="create"))[1][
        "queued"]
    assert [e.revision for e in ledger.entries()] == [sha(1), sha(2)]
    # one structured line per request, never the secret
    logged = [json.loads(line) for line in lines]
    assert [(x["status"], x["repo"], x["revision"], x["outcome"]) for x in logged] == [
        (202, "bob/wh-ft", sha(1), "queued"), (202, "bob/wh-ft", sha(1), "known"),
        (202, "bob/wh-ft", sha(2), "queued")]
    assert SECRET not in "".join(lines) and SECRET not in repr(server)


def test_concurrent_deliveries_queue_each_revision_once(served):
    server, ledger, lines = served
    bodies = [payload("bob/wh-many", sha(i % 4)) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: request(server.url, body), bodies))
    assert {status for status, _, _ in answers} == {202}
    assert sum(answer["queued"] for _, answer, _ in answers) == 4
    assert sorted(e.revision for e in ledger.entries()) == sorted(sha(i) for i in range(4))
    assert len(lines) == 16


def test_the_secret_is_checked(served):
    server, ledger, lines = served
    body = payload("bob/wh-ft", sha(1))
    for secret in ("wrong", SECRET[:-1], SECRET + "x", "", None):
        assert request(server.url, body, secret=secret)[:2] == (
            401, {"error": "missing or wrong X-Webhook-Secret header"})
    # a secret in the query string is not accepted, and never logged
    status, _, _ = request(server.url, body, secret=None, path=f"/webhooks/hub?secret={SECRET}")
    assert status == 401
    assert ledger.entries() == []
    assert SECRET not in "".join(lines)
    assert {json.loads(line)["status"] for line in lines} == {401}


@pytest.mark.parametrize(("body", "error"), [
    (b"{not json", "the body is not JSON"),
    (b"\xff\xfe\x00", "the body is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "the body is not JSON"),
    ([1, 2], "the payload must be a JSON object"),
    ({"repo": {}}, "event must be a JSON object"),
    ({"event": {"action": "update"}, "repo": {"type": "model", "name": "a/b"}},
     "event.scope is missing or not a string"),
    ({**payload("bob/wh-ft", sha(1)), "repo": "bob/wh-ft"}, "repo must be a JSON object"),
    (payload("bob/wh-ft", None), "repo.headSha is missing or not a string"),
    ({**payload("bob/wh-ft", sha(1)), "repo": {**payload("x/y", sha(1))["repo"],
                                                "headSha": 12}},
     "repo.headSha is missing or not a string"),
    (payload("bob/wh-ft", "abc123"), "repo.headSha 'abc123' is not a 40-digit commit sha"),
    (payload("bob/wh-ft", sha(1).upper()), "is not a 40-digit commit sha"),
    (payload("../../etc", sha(1)), "repo.name '../../etc' is not a Hub repo id"),
    (payload("a/b/c", sha(1)), "is not a Hub repo id"),
    ({**payload("bob/wh-ft", sha(1)), "updatedRefs": "refs/heads/main"},
     "updatedRefs must be a list"),
])
def test_malformed_payloads_are_refused(served, body, error):
    server, ledger, _ = served
    status, answer, _ = request(server.url, body)
    assert status == 400 and error in answer["error"]
    assert ledger.entries() == []


def test_other_events_are_ignored(served):
    server, ledger, _ = served
    cases = [
        (payload("bob/wh-data", sha(1), kind="dataset"), "a 'dataset' repo"),
        (payload("bob/wh-space", sha(1), kind="space"), "a 'space' repo"),
        (payload("bob/wh-ft", sha(1), scope="discussion", action="create"),
         "event scope 'discussion' is not a repo update"),
        (payload("bob/wh-ft", sha(1), scope="repo.config"), "event scope 'repo.config'"),
        (payload("bob/wh-ft", sha(1), scope="repo", action="delete"), "event action 'delete'"),
        (payload("bob/wh-ft", sha(1), refs=[{"ref": "refs/pr/3", "oldSha": None,
                                             "newSha": sha(9)}]),
         "no new commit on main (updated: 'refs/pr/3')"),
        (payload("bob/wh-ft", sha(1), refs=[{"ref": "refs/heads/main", "oldSha": sha(1),
                                             "newSha": None}]), "no new commit on main"),
    ]
    for body, why in cases:
        status, answer, _ = request(server.url, body)
        assert status == 200 and why in answer["ignored"], answer
    assert ledger.entries() == []


def test_size_method_and_path_limits(served):
    server, ledger, lines = served
    body = json.dumps(payload("bob/wh-ft", sha(1))).encode()
    big = body[:-1] + b" " * (1_000_001 - len(body)) + b"}"  # valid JSON, one byte too many
    assert len(big) == 1_000_001
    status, answer, _ = request(server.url, big)
    assert status == 413 and "over 1000000 bytes" in answer["error"]
    status, answer, _ = request(server.url, iter([body]))  # chunked: no Content-Length
    assert status == 411
    assert request(server.url, body, headers={"Content-Length": "+1_0"})[0] == 400
    status, _, headers = request(server.url, method="GET", secret=None)
    assert status == 405 and headers["Allow"] == "POST"
    assert request(server.url, body, method="PUT")[0] == 405
    assert request(server.url, body, path="/webhooks/other")[0] == 404
    assert request(server.url, body, path="/")[0] == 404
    assert request(server.url, body, method="BREW")[0] == 501
    assert ledger.entries() == []
    assert [json.loads(line)["status"] for line in lines] == [
        413, 411, 400, 405, 405, 404, 404, 501]
    # exactly max_body_bytes is accepted
    assert request(server.url, big[:-2] + b"}")[0] == 202


def test_no_secret_no_server(tmp_path, monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(UsageError, match=SECRET_ENV):
        resolve_secret(load_settings(None, []))
    for secret in ("", "   ", "s\u00e9cret"):
        with pytest.raises(UsageError):
            WebhookServer(load_settings(None, []), tmp_path, secret)
    monkeypatch.setenv(SECRET_ENV, "from-env")
    assert resolve_secret(load_settings(None, [])) == "from-env"
    settings = load_settings(None, ["webhooks.secret=from-config"])
    assert resolve_secret(settings) == "from-config"
    # settings travel into sweep reports: the secret stays out of every dump
    assert "from-config" not in settings.model_dump_json() + repr(settings)
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "serve-webhooks", "--port", "0",
                           "--workdir", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2 and SECRET_ENV in proc.stderr


def test_the_command_serves_until_sigterm(tmp_path):
    env = {**os.environ, SECRET_ENV: SECRET}
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "serve-webhooks", "--port", "0",
                             "--workdir", str(tmp_path), "--set", "webhooks.path=/hooks/hf"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True).start()
    try:
        first = lines.get(timeout=30)
        assert first.startswith("serving Hub webhooks at http://127.0.0.1:"), first
        url = first.split()[4]
        assert url.endswith("/hooks/hf")
        assert request(url, payload("bob/wh-cli", sha(3)))[:2] == (
            202, {"queued": True, "repo": "bob/wh-cli", "revision": sha(3)})
        logged = json.loads(lines.get(timeout=10))
        assert (logged["status"], logged["repo"], logged["revision"]) == (
            202, "bob/wh-cli", sha(3))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines.get(timeout=10).strip() == "webhook server stopped"
    with Ledger(tmp_path) as ledger:
        assert [(e.repo, e.revision, e.status) for e in ledger.entries()] == [
            ("bob/wh-cli", sha(3), "queued")]


def test_a_webhook_for_a_hub_fine_tune_reaches_the_worker(localhub, zoo, tmp_path,
                                                           monkeypatch):
    """The fine-tune is seeded on the local hub; its webhook is what the Hub would send; the
    worker's claim gets it and judges it a candidate of the watched base."""
    directory, _ = zoo
    localhub.add_user("wanda", "hf_wanda_token")
    wanda = HfApi(endpoint=localhub.url, token="hf_wanda_token")
    upload(wanda, "wanda/wh-base-it", directory / "zoo-base-it",
           card(None, ["safety-aligned"], title="wh-base-it"))
    head = upload(wanda, "wanda/wh-ft-echo", directory / "zoo-ft-echo",
                  card("wanda/wh-base-it", ["fine-tune"], title="wh-ft-echo"))
    info = wanda.model_info("wanda/wh-ft-echo")
    assert info.sha == head
    settings = load_settings(None, ["watch.bases=wanda/wh-base-it"])
    with WebhookServer(settings, tmp_path, SECRET, port=0, log=lambda _: None) as server:
        status, answer, _ = request(server.url, payload(info.id, info.sha))
    assert (status, answer) == (202, {"queued": True, "repo": "wanda/wh-ft-echo",
                                      "revision": head})
    with Ledger(tmp_path / "ledger.sqlite") as ledger:  # what run_once's claim loop does
        entry = ledger.claim("test")
        assert entry is not None and (entry.repo, entry.revision, entry.status) == (
            "wanda/wh-ft-echo", head, "running")
        assert ledger.claim("test") is None
    monkeypatch.setenv("HF_ENDPOINT", localhub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_wanda_token")
    found = candidate_for(entry.repo, entry.revision, settings)
    assert isinstance(found, Candidate), found
    assert (found.base, found.revision, found.kind) == ("wanda/wh-base-it", head, "model")
