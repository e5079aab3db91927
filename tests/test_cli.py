"""The command line as a user runs it: a real process, JSON on stdout, exit codes."""

import json
import subprocess
import sys


def run(*args):
    """The command line in a process; the timeout only catches a hang (the demo's first run
    takes about a minute alone on 2 cores, and several times that on a shared machine)."""
    return subprocess.run([sys.executable, "-m", "bot.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=900)


def test_merge_prints_one_json_object(pair, tmp_path):
    base, ft = pair
    proc = run("merge", base, ft, tmp_path / "out", "--method", "slerp", "--weight", "0.3",
               "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["method"] == "slerp" and result["weight"] == 0.3
    assert result["merged_tensors"] == result["tensors"] == 21
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_errors_map_to_exit_codes_and_one_line(pair, tmp_path):
    base, ft = pair
    proc = run("merge", base, ft, tmp_path / "out", "--weight", "2", "--json")
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["kind"] == "UsageError"
    assert proc.stderr.strip().count("\n") == 0 and "--weight must be in" in proc.stderr
    proc = run("merge", base, tmp_path / "nowhere" / "x", tmp_path / "out")
    assert proc.returncode == 2 and "neither a local directory nor a Hub repo id" in proc.stderr
    (tmp_path / "out").mkdir()
    proc = run("merge", base, ft, tmp_path / "out")
    assert proc.returncode == 8 and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_option_is_a_usage_error(pair, tmp_path):
    base, ft = pair
    proc = run("merge", base, ft, tmp_path / "out", "--no-such-option")
    assert proc.returncode == 2 and "No such option" in proc.stderr


def test_demo_runs_one_cycle_and_a_second_run_publishes_nothing(zoo, tmp_path):
    directory, _ = zoo
    proc = run("demo", "--workdir", tmp_path, "--zoo", directory, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads(proc.stdout)
    decisions = {p["repo"]: p["decision"] for p in first["processed"]}
    assert decisions == {"carol/zoo-ft-flip": "pull-request", "carol/zoo-ft-echo": "variant",
                         "carol/zoo-lora-flip": "variant", "carol/zoo-ft-newtoken": "variant",
                         "dave/zoo-ft-echo": "variant", "dave/zoo-ft-flip-4bit": "variant"}
    assert all(p["status"] == "published" for p in first["processed"])
    # two owners' zoo-ft-echo: two variants, each named after its owner
    variants = {p["repo"]: p["links"]["variant"] for p in first["processed"]
                if p["decision"] == "variant"}
    assert variants["carol/zoo-ft-echo"].endswith("/safeguard-bot/carol__zoo-ft-echo-safeguarded")
    assert variants["dave/zoo-ft-echo"].endswith("/safeguard-bot/dave__zoo-ft-echo-safeguarded")
    # a fine-tune of a quantized copy: a candidate of the watched base, found through the copy
    (copied,) = [c for c in first["candidates"] if c["repo"] == "dave/zoo-ft-flip-4bit"]
    assert (copied["base"], copied["via"]) == ("safeguard/zoo-base-it",
                                               "dave/zoo-base-it-bnb-4bit")
    reasons = {s["repo"]: s["reason"] for s in first["skips"]}
    assert "only pickle weights" in reasons["carol/decoy-pickle"]
    assert "needs remote code" in reasons["carol/decoy-remote-code"]
    assert reasons["carol-lab/zoo-ft-private"].startswith("private")
    assert reasons["carol/zoo-ft-opted-out"].startswith("opted out")
    assert len(reasons) == 8
    feed = (tmp_path / "bot" / "feed" / "results.jsonl").read_text()
    assert "zoo-ft-private" not in feed and "zoo-ft-opted-out" not in feed
    proc = run("demo", "--workdir", tmp_path, "--zoo", directory, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads(proc.stdout)
    assert second["candidates"] == second["skips"] == second["processed"] == []
    assert second["already_seen"] == 14


def test_ctrl_c_leaves_no_half_written_model(tmp_path):
    """A real SIGINT in the middle of a merge: OUT never appears, the staging folder is gone."""
    import signal
    import time

    import torch
    from safetensors.torch import save_file

    for name, seed in (("base", 0), ("ft", 1)):
        (tmp_path / name).mkdir()
        g = torch.Generator().manual_seed(seed)
        save_file({f"w{i}": torch.randn(2048, 4096, generator=g) for i in range(12)},
                  tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text('{"model_type": "toy"}')
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "merge", tmp_path / "base",
                             tmp_path / "ft", out, "--method", "slerp", "--shard-size", "50MB"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*/model-0000[2-9]*")):  # mid-way: shard 2 begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr  # the shell's convention for an interrupt
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_unreachable_hub_is_a_hub_error(pair, tmp_path):
    """A repo id goes to the Hub client; with nothing listening there, a clear exit 7."""
    import os
    import socket

    with socket.socket() as s:  # a loopback port with no server behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base, _ = pair
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "merge", str(base), "org/model@v1",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 7, proc.stderr
    assert "org/model: cannot reach the Hub" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_local_hub_errors_are_the_bots(tmp_path):
    """The local hub has errors of its own; the command line maps them to its exit codes."""
    proc = run("hub", "serve", tmp_path / "hub", "--user", "bad name:hf_token_123", "--json")
    assert proc.returncode == 2 and json.loads(proc.stdout)["kind"] == "UsageError"
    assert "Traceback" not in proc.stderr and "bad name" in proc.stderr
