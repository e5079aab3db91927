"""hub.py: retries on 429/5xx honouring Retry-After, clear errors, over real HTTP on loopback."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bot import hub, hub_calls
from bot.errors import GoneError, HubError, TransientHubError


class Flaky(BaseHTTPRequestHandler):
    """Answers each GET with the next (status, headers) of the server's script, then 200."""

    def do_GET(self):  # noqa: N802
        script = self.server.script
        status, headers = script.pop(0) if script else (200, {})
        self.server.seen.append(self.path)
        body = json.dumps({"id": "org/model", "sha": "a" * 40, "siblings": []} if status == 200
                          else {"error": f"status {status}"}).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    server.script, server.seen = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_calls, "_limits", hub_calls.Limits())  # the defaults, always
    yield server
    server.shutdown()


def test_retries_429_and_5xx_honouring_retry_after(flaky, monkeypatch):
    waits = []
    monkeypatch.setattr(hub_calls.time, "sleep", waits.append)
    flaky.script[:] = [(429, {"Retry-After": "7"}), (503, {}), (502, {})]
    info = hub.model_info("org/model")
    assert info.sha == "a" * 40
    assert waits[0] == 7.0  # Retry-After, then backoff 2**(attempt-1), jittered by 20%
    assert 1.6 <= waits[1] <= 2.4 and 3.2 <= waits[2] <= 4.8
    assert len(flaky.seen) == 4


def test_a_rate_limit_waits_for_its_reset(flaky, monkeypatch):
    waits = []
    monkeypatch.setattr(hub_calls.time, "sleep", waits.append)
    flaky.script[:] = [(429, {"RateLimit": '"api";r=0;t=42',
                              "RateLimit-Policy": '"fixed window";"api";q=500;w=300'})]
    assert hub.model_info("org/model").sha == "a" * 40
    assert waits == [42.0]  # the RateLimit header's reset, not the backoff


def test_gives_up_after_the_last_attempt(flaky, monkeypatch):
    monkeypatch.setattr(hub_calls.time, "sleep", lambda s: None)
    flaky.script[:] = [(500, {})] * hub_calls.MAX_ATTEMPTS
    with pytest.raises(TransientHubError, match="answered 500") as e:
        hub.model_info("org/model")
    assert e.value.transient  # an outage: the caller tries again later
    assert len(flaky.seen) == hub_calls.MAX_ATTEMPTS


@pytest.mark.parametrize("status, error, message", [
    (401, HubError, "HF_TOKEN"), (403, HubError, "HF_TOKEN"),
    (404, GoneError, "not found")])
def test_clear_errors_without_retrying(flaky, monkeypatch, status, error, message):
    monkeypatch.setattr(hub_calls.time, "sleep", lambda s: pytest.fail("no retry expected"))
    flaky.script[:] = [(status, {})]
    with pytest.raises(error, match=message):
        hub.model_info("org/model")
    assert len(flaky.seen) == 1


def test_the_token_is_never_in_an_error(flaky, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    flaky.script[:] = [(401, {})]
    with pytest.raises(HubError) as e:
        hub.model_info("org/model")
    assert "hf_secret_value_123" not in str(e.value)
