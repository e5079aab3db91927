"""The local hub against hostile or broken clients and files (issue 13, "Local hub hardening").

Each test serves a hub of its own; the session `localhub` fixture is requested only for its
client settings (online, loopback only, no Xet). Requests the real client cannot make go
through `http.client` or a bare socket.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import threading
import time

import httpx2
import numpy as np
import pytest
from huggingface_hub import CommitOperationCopy, HfApi, get_session, hf_hub_download
from safetensors.numpy import save

from bot.localhub import LocalHub, LocalHubUsageError, cards

ALICE, BOB = "hf_alice_token", "hf_bob_token"
QUICK = 3.0  # seconds: an answer that comes later than this is one the server sat on


@pytest.fixture
def hub(localhub, tmp_path):
    hub = LocalHub(tmp_path / "hub").start()
    hub.add_user("alice", ALICE)
    hub.add_user("bob", BOB)
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def alice(hub):
    return HfApi(endpoint=hub.url, token=ALICE)


@pytest.fixture
def bob(hub):
    return HfApi(endpoint=hub.url, token=BOB)


def send_headers(hub, method: str, path: str, headers: dict[str, str],
                 body: bytes = b"") -> http.client.HTTPResponse:
    """Send a request's headers (and `body`, maybe less than announced); its answer, which
    must come within QUICK seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=QUICK)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders(body or None)
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (sending nothing more) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def card(meta_yaml: str) -> bytes:
    return f"---\n{meta_yaml}\n---\n\n# A model\n".encode()


def commit_raw(hub, token: str, repo: str, *operations: dict):
    """POST a commit's NDJSON payload as written, past the client's own checks."""
    lines = [{"key": "header", "value": {"summary": "raw commit"}}, *operations]
    return get_session().post(
        f"{hub.url}/api/models/{repo}/commit/main",
        content=b"\n".join(json.dumps(x).encode() for x in lines),
        headers={"authorization": f"Bearer {token}", "content-type": "application/x-ndjson"})


# ---- 1. the token is checked before the body is read


def test_a_bad_token_is_refused_before_the_body_is_read(hub, alice):
    alice.create_repo("alice/open")
    # a megabyte announced, nothing sent: a server that reads bodies first would wait for it
    r = send_headers(hub, "POST", "/api/repos/create",
                     {"Authorization": "Bearer hf_not_a_real_token",
                      "Content-Type": "application/json", "Content-Length": str(10**6)})
    assert r.status == 401 and r.getheader("Connection") == "close"
    # no token at all: a write route answers 401 without reading what it would have written
    r = send_headers(hub, "POST", "/api/models/alice/open/commit/main",
                     {"Content-Type": "application/x-ndjson", "Content-Length": str(10**6)})
    assert r.status == 401 and r.getheader("Connection") == "close"
    # anonymous reads that carry a body still work (paths-info of a public repo)
    anon = HfApi(endpoint=hub.url, token=False)
    assert [p.path for p in anon.get_paths_info("alice/open", [".gitattributes"])] == \
        [".gitattributes"]


# ---- 2. JSON bodies are capped; commits and uploads keep larger limits


def test_api_bodies_are_capped_but_commits_are_not(hub, alice):
    auth = {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"}
    r = send_headers(hub, "POST", "/api/repos/create",
                     {**auth, "Content-Length": str(50 * 1024**2)})
    assert r.status == 413 and r.getheader("Connection") == "close"
    # a chunked body is stopped once it would pass the cap (here: its first chunk's size)
    r = send_headers(hub, "POST", "/api/repos/create",
                     {**auth, "Transfer-Encoding": "chunked"}, b"%x\r\n{" % (50 * 1024**2))
    assert r.status == 413 and r.getheader("Connection") == "close"
    # a commit carries regular files inline (base64): it may be larger than the cap
    alice.create_repo("alice/big-text")
    text = b"0123456789abcdef\n" * (9 * 1024**2 // 17)
    alice.upload_file(path_or_fileobj=text, path_in_repo="big.txt", repo_id="alice/big-text")
    assert alice.model_info("alice/big-text", files_metadata=True).siblings[-1].size == len(text)


# ---- 3. a negative or non-numeric Content-Length


@pytest.mark.parametrize("length", ["-5", "abc", "1e3", "+5", "5, 6"])
def test_a_bad_content_length_is_a_400(hub, length):
    r = send_headers(hub, "POST", "/api/repos/create",
                     {"Authorization": f"Bearer {ALICE}", "Content-Length": length})
    assert r.status == 400 and r.getheader("Connection") == "close"
    assert "Content-Length" in json.loads(r.body)["error"]


def test_a_bad_chunk_size_is_a_400(hub):
    r = send_headers(hub, "POST", "/api/repos/create",
                     {"Authorization": f"Bearer {ALICE}", "Transfer-Encoding": "chunked"},
                     b"-5\r\nhello\r\n0\r\n\r\n")
    assert r.status == 400 and r.getheader("Connection") == "close"


# ---- 4. a silent client does not hold a server thread


def test_a_silent_or_stalled_client_is_dropped(localhub, tmp_path):
    with pytest.raises(LocalHubUsageError):
        LocalHub(tmp_path / "bad", timeout=0)
    with LocalHub(tmp_path / "hub", timeout=0.5) as hub:
        hub.add_user("alice", ALICE)
        stalls = [b"",  # connects and says nothing
                  b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\n",  # half its headers
                  b"POST /api/repos/create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + ALICE.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"name\": "]  # a body
        socks = [socket.create_connection(("127.0.0.1", hub.port)) for _ in stalls]
        try:
            for sock, data in zip(socks, stalls, strict=True):
                sock.sendall(data)
            assert [closed_within(s, QUICK) for s in socks] == [True, True, True]
        finally:
            for sock in socks:
                sock.close()
        assert HfApi(endpoint=hub.url, token=ALICE).whoami()["name"] == "alice"


# ---- 5. card metadata: bounded, no aliases, parsed outside the store's lock


LAUGHS = "a: &a [lol, lol, lol]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]"
BILLION = "\n".join(["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                    + [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
                    + ["tags: *l8"])


def test_card_yaml_is_parsed_with_limits(hub, alice):
    alice.create_repo("alice/cards")

    def commit_card(meta: str) -> int:
        """The status of a commit of that card (raw: the client would check it first)."""
        return commit_raw(hub, ALICE, "alice/cards", {
            "key": "file", "value": {"path": "README.md", "encoding": "base64",
                                     "content": base64.b64encode(card(meta)).decode()}}
                          ).status_code

    assert commit_card(LAUGHS) == 400  # aliases are refused, however small
    t0 = time.monotonic()
    assert commit_card(BILLION) == 400
    assert time.monotonic() - t0 < QUICK
    too_big = "\n".join(f"key{i}: {'v' * 60}" for i in range(2000))  # ~140 KB of metadata
    assert commit_card(too_big) == 400
    assert commit_card("a: " + "[" * 5000 + "]" * 5000) == 400  # nested past any sane depth
    assert commit_card("2024-01-01: a date as a key") == 400
    r = get_session().post(f"{hub.url}/api/validate-yaml",
                           json={"content": card(BILLION).decode()})
    assert r.status_code == 400 and "alias" in r.json()["errors"][0]["message"]
    alice.upload_file(path_or_fileobj=card("tags: [fine]"), path_in_repo="README.md",
                      repo_id="alice/cards")
    assert alice.model_info("alice/cards").card_data.tags == ["fine"]


class SlowYaml:
    """The yaml module, but every load waits for `gate` (and says so through `entered`)."""

    def __init__(self, real):
        self.real, self.gate, self.entered = real, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def _wait(self):
        self.entered.set()
        assert self.gate.wait(20)

    def load(self, *args, **kwargs):
        self._wait()
        return self.real.load(*args, **kwargs)

    def safe_load(self, *args, **kwargs):
        self._wait()
        return self.real.safe_load(*args, **kwargs)


def while_a_card_is_parsed(monkeypatch, url: str, call) -> float:
    """Run `call` in a thread until the hub is inside a card's YAML; how long a whoami then
    takes (a request that needs the store's lock)."""
    slow = SlowYaml(cards.yaml)
    monkeypatch.setattr(cards, "yaml", slow)
    errors: list[BaseException] = []

    def run():
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert slow.entered.wait(10)
        t0 = time.monotonic()
        with httpx2.Client(timeout=QUICK) as c:
            who = c.get(f"{url}/api/whoami-v2", headers={"authorization": f"Bearer {BOB}"})
        assert who.json()["name"] == "bob"
        return time.monotonic() - t0
    finally:
        slow.gate.set()
        thread.join(20)
        monkeypatch.setattr(cards, "yaml", slow.real)
        assert errors == []


def test_cards_are_parsed_outside_the_store_lock(hub, alice, monkeypatch, tmp_path):
    alice.create_repo("alice/slow")

    def commit():
        alice.upload_file(path_or_fileobj=card("tags: [slow-card]"), path_in_repo="README.md",
                          repo_id="alice/slow")
    assert while_a_card_is_parsed(monkeypatch, hub.url, commit) < QUICK
    # a fresh hub on the same directory parses the card again, for the first listing
    hub.stop()
    with LocalHub(hub.directory) as again:
        def listing():
            assert [m.id for m in HfApi(endpoint=again.url, token=ALICE)
                    .list_models(filter="slow-card")] == ["alice/slow"]
        assert while_a_card_is_parsed(monkeypatch, again.url, listing) < QUICK


# ---- 6. one broken file does not break listings


def test_a_broken_file_does_not_break_listings(hub, alice):
    good = save({"w": np.zeros((2, 4), dtype=np.float32)})

    def header(data) -> bytes:
        raw = json.dumps(data).encode()
        return len(raw).to_bytes(8, "little") + raw

    repos = {
        "alice/st-good": {"model.safetensors": good, "config.json": b"{not json"},
        "alice/st-list": {"model.safetensors": header([1, 2, 3])},
        "alice/st-shape": {"model.safetensors": header(
            {"w": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 0]}})},
        "alice/st-dtype": {"model.safetensors": header(
            {"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 4},
    }
    for repo, files in repos.items():
        alice.create_repo(repo)
        for path, data in {**files, "README.md": card("tags: [broken-files]")}.items():
            alice.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo)
    listed = {m.id: m for m in alice.list_models(filter="broken-files", expand=["safetensors"])}
    assert sorted(listed) == sorted(repos)
    assert listed["alice/st-good"].safetensors.total == 8
    for repo in ("alice/st-list", "alice/st-shape", "alice/st-dtype"):
        assert listed[repo].safetensors is None
        info = alice.model_info(repo)
        assert info.safetensors is None and "broken-files" in info.tags


# ---- 7. a commit names only blobs its author may read


def test_a_commit_cannot_name_a_blob_of_someone_elses_private_repo(hub, alice, bob, tmp_path):
    secret = os.urandom(4096)
    oid = hashlib.sha256(secret).hexdigest()
    alice.create_repo("alice/vault", private=True)
    alice.upload_file(path_or_fileobj=secret, path_in_repo="secret.bin", repo_id="alice/vault")
    bob.create_repo("bob/heist")
    session, auth = get_session(), {"authorization": f"Bearer {BOB}"}
    lfs = f"{hub.url}/bob/heist.git/info/lfs/objects"
    batch = session.post(f"{lfs}/batch", headers=auth, json={
        "operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
        "objects": [{"oid": oid, "size": len(secret)}]}).json()
    assert "actions" in batch["objects"][0]  # bob must send the bytes: the hub won't say it has
    verify = session.post(f"{lfs}/verify", headers=auth, json={"oid": oid, "size": len(secret)})
    assert verify.status_code == 404
    r = commit_raw(hub, BOB, "bob/heist", {"key": "lfsFile", "value": {
        "path": "loot.bin", "algo": "sha256", "oid": oid, "size": len(secret)}})
    assert r.status_code == 400 and "was not uploaded" in r.json()["error"]
    assert bob.list_repo_files("bob/heist") == [".gitattributes"]
    # who has the bytes may upload them (again); owners may copy what their repo holds
    bob.upload_file(path_or_fileobj=secret, path_in_repo="mine.bin", repo_id="bob/heist")
    path = hf_hub_download("bob/heist", "mine.bin", endpoint=hub.url, token=BOB,
                           cache_dir=tmp_path / "cache")
    with open(path, "rb") as f:
        assert f.read() == secret
    alice.create_commit("alice/vault", [CommitOperationCopy("secret.bin", "copy.bin")],
                        commit_message="copy")
    assert sorted(alice.list_repo_files("alice/vault")) == \
        [".gitattributes", "copy.bin", "secret.bin"]
