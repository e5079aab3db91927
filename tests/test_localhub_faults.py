"""The local hub's fault mode (bot/localhub/faults.py) seen by the real huggingface_hub client.

Each test serves a hub of its own (faults would disturb the session's shared hub); the session
`localhub` fixture is requested only for its client settings (online, loopback only, no Xet).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx2
import numpy as np
import pytest
from huggingface_hub import HfApi, get_session, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import parse_ratelimit_headers
from safetensors.numpy import save

from bot.localhub import Fault, LocalHub, LocalHubUsageError

ALICE = "hf_alice_token"
AUTH = {"authorization": f"Bearer {ALICE}"}


@pytest.fixture
def hub(localhub, tmp_path):
    hub = LocalHub(tmp_path / "hub").start()
    hub.add_user("alice", ALICE)
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=ALICE)


def client(timeout: float = 10) -> httpx2.Client:
    return httpx2.Client(timeout=timeout)


# ---- the four kinds against real calls


def test_status_for_the_first_requests_then_normal(hub, api):
    api.create_repo("alice/flaky")
    fault = hub.add_fault(Fault("status", path=r"^/api/models/", status=503, first=2))
    assert hub.faults == [fault]
    for _ in range(2):
        with pytest.raises(HfHubHTTPError) as e:
            HfApi(endpoint=hub.url, token=ALICE).model_info("alice/flaky")
        assert e.value.response.status_code == 503
        assert "local hub fault: injected 503" in str(e.value)
    assert api.whoami()["name"] == "alice"  # another path: untouched, not even matched
    assert api.model_info("alice/flaky").id == "alice/flaky"
    assert hub.faults[0].injected == 2 and hub.faults[0].matched == 3


def test_after_does_the_work_then_answers_the_fault(hub, api):
    api.create_repo("alice/landed")
    hub.add_fault(Fault("status", method="POST", path=r"^/api/models/alice/landed/commit/",
                        status=503, after=True, first=1))
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=b"hello", path_in_repo="note.txt",
                        repo_id="alice/landed")
    assert e.value.response.status_code == 503
    assert api.list_repo_commits("alice/landed")[0].title.startswith("Upload note.txt")


def test_429_carries_the_hubs_rate_limit_headers(hub, api):
    api.create_repo("alice/limited")
    hub.add_fault(Fault("status", path=r"^/api/models", status=429, seconds=2.5))
    r = get_session().get(f"{hub.url}/api/models/alice/limited", headers=AUTH)
    assert r.status_code == 429
    assert r.json() == {"error": "local hub fault: injected 429"}
    assert r.headers["Retry-After"] == "3"
    assert r.headers["RateLimit"] == '"api";r=0;t=3'
    info = parse_ratelimit_headers(r.headers)
    assert (info.resource_type, info.remaining, info.reset_in_seconds) == ("api", 0, 3)
    assert (info.limit, info.window_seconds) == (500, 300)
    with pytest.raises(HfHubHTTPError, match="rate limit") as e:
        api.model_info("alice/limited")
    assert e.value.response.status_code == 429


def test_hang_delays_or_times_out(hub):
    fault = hub.add_fault(Fault("hang", path="whoami", seconds=0.4, first=1))
    with client(timeout=5) as c:
        t0 = time.monotonic()
        r = c.get(f"{hub.url}/api/whoami-v2", headers=AUTH)
        assert r.status_code == 200 and r.json()["name"] == "alice"
        assert time.monotonic() - t0 >= 0.4
        assert fault.injected == 1
    hub.clear_faults()
    hub.add_fault(Fault("hang", path="whoami", seconds=5))
    with client(timeout=0.3) as c, pytest.raises(httpx2.ReadTimeout):
        c.get(f"{hub.url}/api/whoami-v2", headers=AUTH)


def test_stop_does_not_wait_for_a_hanging_request(hub):
    fault = hub.add_fault(Fault("hang", seconds=60))
    errors: list[BaseException] = []

    def request() -> None:
        try:
            with client(timeout=30) as c:
                c.get(f"{hub.url}/api/whoami-v2", headers=AUTH)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while fault.matched == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fault.injected == 1
    t0 = time.monotonic()
    hub.stop()
    assert time.monotonic() - t0 < 2
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], httpx2.TransportError)


def test_drop_closes_without_an_answer(hub, api):
    hub.add_fault(Fault("drop", path="whoami", first=1))
    with client() as c:
        with pytest.raises(httpx2.RemoteProtocolError):
            c.get(f"{hub.url}/api/whoami-v2", headers=AUTH)
        assert c.get(f"{hub.url}/api/whoami-v2", headers=AUTH).status_code == 200
    hub.add_fault(Fault("drop", method="POST"))  # with a request body left unread
    with pytest.raises(httpx2.TransportError):
        api.create_repo("alice/dropped")
    hub.clear_faults()
    assert api.create_repo("alice/dropped").repo_id == "alice/dropped"


def test_probability_is_reproducible_with_a_seed(localhub, tmp_path):
    def pattern(directory, seed: int) -> list[bool]:
        with LocalHub(directory) as h, client() as c:
            fault = h.add_fault(Fault("status", path="whoami", status=500, probability=0.25,
                                      seed=seed))
            out = [c.get(f"{h.url}/api/whoami-v2").status_code == 500 for _ in range(200)]
            assert (fault.matched, fault.injected) == (200, sum(out))
            return out

    first = pattern(tmp_path / "a", seed=7)
    assert pattern(tmp_path / "b", seed=7) == first
    assert 20 <= sum(first) <= 80
    assert pattern(tmp_path / "c", seed=8) != first


def test_method_filter_on_downloads(hub, api):
    api.create_repo("alice/files")
    fault = hub.add_fault(Fault("status", path="/resolve/", method="head", status=502))
    assert fault.method == "HEAD"
    url = f"{hub.url}/alice/files/resolve/main/.gitattributes"
    with client() as c:
        assert c.head(url, headers=AUTH).status_code == 502
        got = c.get(url, headers=AUTH)
        assert got.status_code == 200 and b"safetensors" in got.content
    assert (fault.matched, fault.injected) == (1, 1)


def test_lfs_upload_fault_is_retried_by_the_client(hub, api, tmp_path):
    api.create_repo("alice/upload")
    fault = hub.add_fault(Fault("status", path="^/lfs-upload/", method="PUT", status=500,
                                first=1))
    data = save({"w": np.arange(64, dtype=np.float32)})
    api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/upload")
    assert (fault.matched, fault.injected) == (2, 1)  # the client's backoff tried again
    path = hf_hub_download("alice/upload", "w.safetensors", endpoint=hub.url, token=ALICE,
                           cache_dir=tmp_path / "cache")
    with open(path, "rb") as f:
        assert f.read() == data


def test_first_matching_fault_wins_and_clear_faults(hub):
    a = hub.add_fault(Fault("status", path="whoami", status=418, first=1))
    b = hub.add_fault(Fault("status", status=504))
    assert hub.faults == [a, b]
    with client() as c:
        codes = [c.get(f"{hub.url}/api/whoami-v2").status_code for _ in range(2)]
        assert codes == [418, 504]
        assert (a.matched, a.injected, b.matched, b.injected) == (2, 1, 1, 1)
        hub.clear_faults()
        assert hub.faults == []
        assert c.get(f"{hub.url}/api/whoami-v2", headers=AUTH).status_code == 200


def test_faults_added_before_start_and_bad_arguments(tmp_path):
    hub = LocalHub(tmp_path / "hub")
    hub.add_fault(Fault("status", status=503))
    with hub, client() as c:
        assert c.get(f"{hub.url}/api/whoami-v2").status_code == 503
    with pytest.raises(LocalHubUsageError, match="not both"):
        Fault("drop", first=1, probability=0.5)
    with pytest.raises(LocalHubUsageError, match="kind"):
        Fault("explode")  # type: ignore[arg-type]
    with pytest.raises(LocalHubUsageError, match="regex"):
        Fault("drop", path="(")
    with pytest.raises(LocalHubUsageError, match="wants a Fault"):
        hub.add_fault("status=503")  # type: ignore[arg-type]


# ---- the CLI grammar


@pytest.mark.parametrize(("spec", "expected"), [
    ("status=429,path=^/api/models,first=3,reset=2",
     Fault("status", path="^/api/models", status=429, seconds=2, first=3)),
    ("hang=30,path=/resolve/", Fault("hang", path="/resolve/", seconds=30)),
    ("drop,probability=0.1,seed=7", Fault("drop", probability=0.1, seed=7)),
    ("status=500,method=put,path=^/a{1,3}/b", Fault("status", path="^/a{1,3}/b", method="PUT",
                                                     status=500)),
    ("status=503,after,method=POST", Fault("status", method="POST", after=True)),
])
def test_parse(spec, expected):
    fault = Fault.parse(spec)
    assert fault == expected
    assert Fault.parse(str(fault)) == fault


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty item"),
    ("path=x", "exactly one of"),
    ("status=503,drop", "exactly one of"),
    ("status=abc", "status wants an integer"),
    ("status=99", "100-599"),
    ("status=600", "100-599"),
    ("hang=-1", "hang wants seconds >= 0"),
    ("hang=soon", "hang wants a number"),
    ("drop,first=0", "first must be an integer >= 1"),
    ("drop,probability=0", r"probability must be in \(0, 1\]"),
    ("drop,probability=1.5", r"probability must be in \(0, 1\]"),
    ("drop,first=2,probability=0.5", "not both"),
    ("drop,path=(", "not a valid regex"),
    ("drop,colour=red", "unknown key 'colour'"),
    ("drop=yes", "drop takes no value"),
    ("status=503,reset=2", "status=429 only"),
    ("drop,method=G-T", "method must be a word"),
    ("status=503,status=504", "given twice"),
    ("drop,after", "only for status"),
    ("status=503,after=yes", "after takes no value"),
])
def test_parse_refuses_bad_specs(spec, message):
    with pytest.raises(LocalHubUsageError, match=message):
        Fault.parse(spec)


# ---- hub serve --fault


def serve(directory, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "hub", "serve", str(directory), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_bad_fault_exits_2(tmp_path):
    proc = serve(tmp_path / "hub", "--fault", "status=503", "--fault", "drop,first=1,seed=x")
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert lines == ["error: bad fault spec 'drop,first=1,seed=x': seed wants an integer, "
                     "not 'x'"]
    assert out == "" and not (tmp_path / "hub").exists()


def test_cli_served_fault(tmp_path):
    proc = serve(tmp_path / "hub", "--json", "--user", "dave:hf_dave_token",
                 "--fault", "status=503,path=^/api/whoami")
    try:
        started = json.loads(proc.stdout.readline())
        with client() as c:
            r = c.get(f"{started['url']}/api/whoami-v2")
            assert r.status_code == 503
            assert r.json() == {"error": "local hub fault: injected 503"}
            assert c.get(f"{started['url']}/api/models").status_code == 200
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 0, err
    assert "fault: status=503,path=^/api/whoami" in err and "stopped" in err
