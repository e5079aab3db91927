"""Deployment files: the GitHub workflows, the Dockerfile and .dockerignore.

They cannot run here (no GitHub, no Docker), so what can be checked is checked for real: the YAML
and its job wiring, every `safeguard-bot` command line against the CLI's own parser, the inline
Python steps run as GitHub would run them (on real `run --once --discover-only` output from the
local hub), the package built from exactly what the Dockerfile copies, and the linters
(actionlint, zizmor, hadolint; each test skips, saying why, where its tool is missing).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import typer
import yaml

from bot.cli import app
from bot.discovery import Candidate, Discovery, Skip

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
CI, SAFEGUARD = WORKFLOWS / "ci.yml", WORKFLOWS / "safeguard.yml"
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent  # .venv/bin: the dev extras' linters land here
SHA = "0123456789abcdef0123456789abcdef01234567"
EXPR = re.compile(r"\$\{\{(.*?)\}\}", re.S)


def load(path: Path) -> dict:
    """A workflow, with `on` restored (YAML 1.1 reads the bare key `on` as True)."""
    wf = yaml.safe_load(path.read_text())
    if True in wf:
        wf["on"] = wf.pop(True)
    return wf


def tool(name: str) -> str | None:
    found = BIN / name
    return str(found) if found.exists() else shutil.which(name)


def steps(wf: dict):
    """(job id, step) for every step of every job."""
    for job_id, job in wf["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, step


def step_named(wf: dict, job: str, name: str) -> dict:
    return next(s for s in wf["jobs"][job]["steps"] if s.get("name") == name or
                s.get("id") == name)


def expressions(node) -> list[str]:
    """The text inside every ${{ }} of a YAML subtree."""
    return [m.strip() for m in EXPR.findall(json.dumps(node))]


# --- shape and wiring -------------------------------------------------------------------------

def test_workflows_parse_with_their_triggers_and_read_only_token():
    ci, sg = load(CI), load(SAFEGUARD)
    assert set(ci["on"]) == {"push", "pull_request"}
    assert set(sg["on"]) == {"schedule", "workflow_dispatch"}
    assert len(sg["on"]["schedule"][0]["cron"].split()) == 5
    inputs = sg["on"]["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"max_parallel", "dry_run"}
    assert inputs["dry_run"]["type"] == "boolean" and inputs["dry_run"]["default"] is False
    for wf in (ci, sg):
        assert wf["permissions"] == {"contents": "read"}
        for _, step in steps(wf):  # no token left in .git for later steps
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False


def test_ci_runs_what_ci_run_runs():
    """ci.yml: scripts/setup, then the lint and test lines of .ci/run, on Python 3.11."""
    job = load(CI)["jobs"]["test"]
    assert job["runs-on"] == "ubuntu-latest"
    runs = [s["run"].strip() for s in job["steps"] if "run" in s]
    local = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.startswith(".venv/bin/")]
    assert runs == ["scripts/setup", *local], "ci.yml and .ci/run should run the same commands"
    assert {".venv/bin/ruff check .", ".venv/bin/python -m pytest -q"} <= set(runs)
    readme = (ROOT / "README.md").read_text()
    assert "scripts/setup && .venv/bin/python -m pytest -q" in readme
    python = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert python["with"]["python-version"] == "3.11" and python["with"]["cache"] == "pip"


def test_ci_caches_the_zoo_by_its_sources():
    cache = next(s for s in load(CI)["jobs"]["test"]["steps"]
                 if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"] == ".cache/zoo"
    # the cache must be restored before anything builds the zoo
    order = [s.get("uses") or s.get("run") for s in load(CI)["jobs"]["test"]["steps"]]
    assert order.index(cache["uses"]) < order.index(".venv/bin/python -m pytest -q")
    globs = re.findall(r"'([^']+)'", re.search(r"hashFiles\((.*?)\)", cache["with"]["key"])[1])
    assert set(globs) == {"bot/zoo/*.py", "bot/evaluate/generation.py", "bot/evaluate/safety.py"}
    for pattern in globs:  # a glob that matches nothing would key the cache on nothing
        assert list(ROOT.glob(pattern)), pattern
    from conftest import ZOO_CACHE

    assert ROOT / cache["with"]["path"] == ZOO_CACHE  # where the tests build the zoo


def test_ci_postgres_service_matches_the_test_url():
    job = load(CI)["jobs"]["test"]
    url = job["env"]["SAFEGUARD_TEST_POSTGRES_URL"]
    service = job["services"]["postgres"]
    host_port = service["ports"][0].split(":")[0]
    assert url == (f"postgresql+psycopg://{service['env']['POSTGRES_USER']}@127.0.0.1:"
                   f"{host_port}/{service['env']['POSTGRES_DB']}")


def test_discover_process_feed_are_wired(monkeypatch):
    wf = load(SAFEGUARD)
    jobs = wf["jobs"]
    discover, process, feed_job = jobs["discover"], jobs["process"], jobs["feed"]
    assert discover["runs-on"] == "ubuntu-latest"
    assert process["runs-on"] == ["self-hosted", "gpu"]
    assert process["needs"] in ("discover", ["discover"])
    assert feed_job["needs"] in ("process", ["process"]) and "always()" in feed_job["if"]
    # the matrix comes from discover's declared outputs, written by a step that exists
    strategy = process["strategy"]
    assert strategy["fail-fast"] is False
    assert strategy["matrix"]["candidate"] == \
        "${{ fromJSON(needs.discover.outputs.candidates) }}"
    assert "needs.discover.outputs.count != '0'" in process["if"]
    max_parallel = strategy["max-parallel"]
    assert "inputs.max_parallel" in max_parallel and "vars.SAFEGUARD_MAX_PARALLEL" in max_parallel
    used = set(re.findall(r"needs\.discover\.outputs\.(\w+)", json.dumps(wf)))  # ifs too
    assert used == {"candidates", "count"} and used <= set(discover["outputs"])
    ids = {s.get("id") for s in discover["steps"]}
    for name, value in discover["outputs"].items():
        step_id, output = re.fullmatch(r"\$\{\{ steps\.([\w-]+)\.outputs\.(\w+) \}\}",
                                       value).groups()
        assert step_id in ids and output == name
    # one job per repo at a time, by the matrix item's own repo field
    assert process["concurrency"] == {"group": "safeguard-${{ matrix.candidate.repo }}",
                                      "cancel-in-progress": False}
    # the shared ledger and the token come from secrets
    for job in (discover, process):
        assert job["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
        assert "secrets.SAFEGUARD_LEDGER_URL" in job["env"]["SAFEGUARD_LEDGER_URL"]
    assert process["env"]["SAFEGUARD_LEDGER_URL"] == "${{ secrets.SAFEGUARD_LEDGER_URL }}"
    # a GPU job's claim lasts as long as the job may, so no other worker takes it meanwhile
    from bot.config import load_settings

    for name, value in process["env"].items():  # the job's settings, as bot/config reads them
        if name != "SAFEGUARD_LEDGER_URL":
            monkeypatch.setenv(name, value)
    assert load_settings().ledger.lease_seconds >= process["timeout-minutes"] * 60


def test_no_expression_is_pasted_into_a_script():
    """Every value reaches a `run:` script through env (no script injection from Hub names)."""
    for wf in (load(CI), load(SAFEGUARD)):
        for job_id, step in steps(wf):
            assert "${{" not in step.get("run", ""), (job_id, step.get("name"))


def test_torch_pin_and_extras_agree_everywhere():
    setup = re.search(r'torch==([\d.]+)', (ROOT / "scripts" / "setup").read_text())[1]
    assert load(SAFEGUARD)["env"]["TORCH_VERSION"] == setup
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M)[1] == setup
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    texts = [s.get("run", "") for _, s in steps(load(SAFEGUARD))] + [DOCKERFILE.read_text()]
    wanted = {x for t in texts for group in re.findall(r'pip install [^\n]*?\S\[([\w,]+)\]', t)
              for x in group.split(",")}
    assert wanted == {"postgres"} and wanted <= set(extras)


# --- every safeguard-bot command line against the CLI -----------------------------------------

def _shell_lines(script: str) -> list[str]:
    return script.replace("\\\n", " ").splitlines()


def invocations() -> list[tuple[str, list[str]]]:
    """(where, args) for each `safeguard-bot ...` in the workflows' shell steps and the image."""
    found = []
    for path in (CI, SAFEGUARD):
        for job_id, step in steps(load(path)):
            if "run" not in step or step.get("shell") == "python":
                continue
            for line in _shell_lines(step["run"]):
                lex = shlex.shlex(line, posix=True, punctuation_chars=True)
                lex.whitespace_split = True
                lex.commenters = "#"
                tokens = list(lex)
                for i, token in enumerate(tokens):
                    if Path(token).name == "safeguard-bot":
                        args = []
                        for t in tokens[i + 1:]:
                            if set(t) <= set("();<>|&"):
                                break
                            args.append(t)
                        found.append((f"{path.name}:{job_id}", args))
    text = DOCKERFILE.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M)[1])
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M)[1])
    if entry == ["safeguard-bot"]:  # else test_dockerfile_shape says what is wrong
        found.append(("Dockerfile", cmd))
    return found


INVOCATIONS = invocations()


def test_the_workflows_and_the_image_call_the_commands_they_should():
    called = {(where, args[0]) for where, args in INVOCATIONS}
    assert called == {("safeguard.yml:discover", "run"), ("safeguard.yml:process", "process"),
                      ("Dockerfile", "watch")}
    discover = next(a for w, a in INVOCATIONS if w == "safeguard.yml:discover")
    assert {"--once", "--discover-only", "--json"} <= set(discover)
    process = next(a for w, a in INVOCATIONS if w == "safeguard.yml:process")
    assert process[1] == "$REF" and process[-2:] == ["--set", "sweep.device=cuda"]
    assert load(SAFEGUARD)["jobs"]["process"]["env"]["REF"] == "${{ matrix.candidate.ref }}"


@pytest.mark.parametrize("where,args", INVOCATIONS, ids=[f"{w}:{a[0]}" for w, a in INVOCATIONS])
def test_each_command_line_parses_with_the_cli(where, args):
    """The command (nested groups too) and each option exist, and click parses the whole line.

    typer builds click objects (its own vendored click in recent versions), so groups are
    recognised by their `commands`."""
    command = typer.main.get_command(app)
    rest = list(args)
    path = []
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        if name not in command.commands:
            raise AssertionError(f"{where}: `safeguard-bot {' '.join(path + [name])}` is not a "
                                 f"command (there are: {', '.join(sorted(command.commands))})")
        path.append(name)
        command = command.commands[name]
    assert not hasattr(command, "commands"), f"{where}: {path} needs a subcommand"
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for token in rest:
        if token.startswith("-"):
            assert token.split("=")[0] in known, f"{where}: {path} has no option {token}"
    ctx = command.make_context(" ".join(["safeguard-bot", *path]), list(rest))  # or raises
    ctx.close()
    from bot.config import load_settings

    for i, token in enumerate(rest):
        if token == "--set":  # each setting exists and takes the value
            load_settings(None, [rest[i + 1]])


# --- the inline Python steps, run as GitHub runs them -----------------------------------------

def run_step(step: dict, cwd: Path, env: dict | None = None) -> tuple:
    """Run a `shell: python` step's script in `cwd` with GITHUB_OUTPUT and GITHUB_STEP_SUMMARY.

    Returns (process, outputs as GitHub reads them, summary text)."""
    assert step["shell"] == "python"
    script = cwd / "step.py"
    script.write_text(step["run"])
    output, summary = cwd / "github_output", cwd / "github_summary"
    full = {**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"},
            "GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(summary),
            "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)
    outputs = {}
    if output.exists():
        lines = iter(output.read_text().splitlines())
        for line in lines:
            name, sep, value = line.partition("=")
            if not sep:  # name<<DELIMITER ... DELIMITER
                name, delimiter = line.split("<<", 1)
                value = "\n".join(iter(lines.__next__, delimiter))
            outputs[name] = value
    return proc, outputs, summary.read_text() if summary.exists() else ""


def matrix_fields() -> set[str]:
    """The matrix.candidate fields the process job uses."""
    return set(re.findall(r"matrix\.candidate\.(\w+)", json.dumps(load(SAFEGUARD)["jobs"])))


def check_matrix(outputs: dict, expected_refs: list[str]) -> list[dict]:
    """What `fromJSON(needs.discover.outputs.candidates)` gives the process job."""
    matrix = json.loads(outputs["candidates"])
    assert outputs["count"] == str(len(matrix))
    assert [m["ref"] for m in matrix] == expected_refs
    from bot.hub import parse_model_ref

    for item in matrix:
        assert matrix_fields() <= set(item), (matrix_fields(), item)
        repo, revision = parse_model_ref(item["ref"])  # what `process REF` accepts
        assert repo == item["repo"] and len(revision) == 40
    return matrix


def discovery_json(candidates: list[Candidate], skips: list[Skip]) -> str:
    """`run --once --discover-only --json` output, from the bot's own dataclasses."""
    found = Discovery(candidates, skips, already_seen=3, deferred=1).to_dict()
    return json.dumps({**found, "processed": [], "stopped": False, "seconds": 1.2})


def candidate(repo: str, kind: str = "model", action: str = "variant") -> Candidate:
    return Candidate(repo, SHA, "Qwen/Qwen2.5-1.5B-Instruct", kind, action, 3_000_000_000,
                     "apache-2.0", "2026-11-30T00:00:00+00:00")


def test_the_matrix_step_turns_discovery_into_the_process_matrix(tmp_path):
    step = step_named(load(SAFEGUARD), "discover", "matrix")
    found = [candidate("org/ft-a"), candidate("org/lora-b", "adapter", "pull-request"),
             candidate("org/ft-a")]  # listed twice (fine-tune and adapter relation): once
    skips = [Skip("org/quant", SHA, "Qwen/Qwen2.5-1.5B-Instruct", "model",
                  "quantized (GGUF files)")]
    (tmp_path / "discovery.json").write_text(discovery_json(found, skips))
    proc, outputs, summary = run_step(step, tmp_path)
    assert proc.returncode == 0, proc.stderr
    matrix = check_matrix(outputs, [f"org/ft-a@{SHA}", f"org/lora-b@{SHA}"])
    assert matrix[1] == {"ref": f"org/lora-b@{SHA}", "repo": "org/lora-b", "kind": "adapter",
                         "action": "pull-request"}
    assert "2 candidate(s), 1 skipped, 3 already seen, 1 deferred" in summary
    assert "quantized (GGUF files)" in summary


def test_no_candidates_gives_count_zero_and_the_gpu_jobs_are_skipped(tmp_path):
    step = step_named(load(SAFEGUARD), "discover", "matrix")
    (tmp_path / "discovery.json").write_text(discovery_json([], []))
    proc, outputs, _ = run_step(step, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert outputs == {"candidates": "[]", "count": "0"}  # process: if count != '0'


def test_more_candidates_than_a_matrix_takes_fail_loudly(tmp_path):
    step = step_named(load(SAFEGUARD), "discover", "matrix")
    many = [candidate(f"org/ft-{i}") for i in range(257)]
    (tmp_path / "discovery.json").write_text(discovery_json(many, []))
    proc, outputs, _ = run_step(step, tmp_path)
    assert proc.returncode != 0 and "watch.max_candidates" in proc.stderr
    assert outputs == {}


@pytest.fixture(scope="module")
def deploy_hub(localhub, pair):
    """The local hub with a base, two fine-tunes of it and a pickle-only one: repo -> sha."""
    from huggingface_hub import HfApi

    from bot.zoo.seed import card, upload

    base_dir, ft_dir = pair
    alice = HfApi(endpoint=localhub.url, token="hf_alice_token")
    bob = HfApi(endpoint=localhub.url, token="hf_bob_token")
    base = "alice/deploy-base-it"
    shas = {base: upload(alice, base, base_dir, card(None, ["safety-aligned"]))}
    for name, tags in [("deploy-ft-a", ["safeguard"]), ("deploy-ft-b", [])]:
        shas[f"bob/{name}"] = upload(bob, f"bob/{name}", ft_dir,
                                     card(base, ["fine-tune", *tags], relation="finetune"))
    pickled = ft_dir.parent / "pickled"
    pickled.mkdir(exist_ok=True)
    shutil.copy(ft_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not safetensors")
    shas["bob/deploy-pickled"] = upload(bob, "bob/deploy-pickled", pickled,
                                        card(base, ["fine-tune"], relation="finetune"))
    return localhub, shas


def test_discovery_on_the_local_hub_through_the_matrix_step(deploy_hub, tmp_path):
    """The discover job for real: its command line, settings from env, then its matrix step."""
    hub, shas = deploy_hub
    args = next(a for w, a in INVOCATIONS if w == "safeguard.yml:discover")
    args = [a.replace("$RUNNER_TEMP", str(tmp_path)) for a in args]
    env = {**os.environ, **hub.env("hf_alice_token"),
           "SAFEGUARD_WATCH_BASES": "alice/deploy-base-it",  # as a workflow's env would set it
           "SAFEGUARD_LEDGER_URL": ""}  # the dry run's throwaway ledger
    proc = subprocess.run([sys.executable, "-m", "bot.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "discovery.json").write_text(proc.stdout)
    assert (tmp_path / "safeguard-work" / "ledger.sqlite").exists()
    step = step_named(load(SAFEGUARD), "discover", "matrix")
    proc, outputs, summary = run_step(step, tmp_path)
    assert proc.returncode == 0, proc.stderr
    refs = sorted(json.loads(outputs["candidates"]), key=lambda m: m["repo"])
    matrix = check_matrix({**outputs, "candidates": json.dumps(refs)},
                          [f"bob/deploy-ft-a@{shas['bob/deploy-ft-a']}",
                           f"bob/deploy-ft-b@{shas['bob/deploy-ft-b']}"])
    assert {m["repo"]: m["action"] for m in matrix} == {"bob/deploy-ft-a": "pull-request",
                                                        "bob/deploy-ft-b": "variant"}
    assert "bob/deploy-pickled" in summary and "1 skipped" in summary


def test_the_report_step_fails_the_job_only_for_a_failed_candidate(tmp_path):
    step = step_named(load(SAFEGUARD), "process", "Report the outcome")
    (tmp_path / "out").mkdir()
    published = {"repo": "org/ft-a", "revision": SHA, "status": "published",
                 "decision": "pull-request", "reason": "ASR 0.9 -> 0.1",
                 "links": {"pull_request": "https://hf.co/org/ft-a/discussions/1"}}
    (tmp_path / "out" / "result.json").write_text(json.dumps(published))
    proc, _, summary = run_step(step, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "published (pull-request)" in summary and "discussions/1" in summary
    for status, code in [("unclaimable", 0), ("skipped", 0), ("deferred", 0), ("failed", 1)]:
        result = {"repo": "org/ft-a", "revision": SHA, "status": status, "reason": "x"}
        (tmp_path / "out" / "result.json").write_text(json.dumps(result))
        assert run_step(step, tmp_path)[0].returncode == code, status


def _artifacts(root: Path, records_by_job: list[list]) -> None:
    """download-artifact's layout: artifacts/feed-<index>/feed/results.jsonl."""
    from bot.publish import feed

    for index, records in enumerate(records_by_job):
        feed.write_local(records, root / "artifacts" / f"feed-{index}" / "feed")


def test_the_feed_step_builds_the_leaderboard_from_the_artifacts(tmp_path):
    from bot.publish import feed

    a = feed.record("org/ft-a", SHA, "org/base", "variant", "ok")
    b = feed.record("org/ft-b", SHA, "org/base", "failed", "disk full")
    _artifacts(tmp_path, [[a], [b, a]])  # a record seen twice is listed once
    step = step_named(load(SAFEGUARD), "feed", "Build the leaderboard and the Atom feed")
    proc, _, _ = run_step(step, tmp_path)
    assert proc.returncode == 0, proc.stderr
    site = tmp_path / "site"
    assert len((site / "results.jsonl").read_text().splitlines()) == 2
    html = (site / "leaderboard.html").read_text()
    assert "org/ft-a" in html and "org/ft-b" in html
    entries = ET.fromstring((site / "feed.atom").read_text().split("\n", 1)[1])
    assert len(entries.findall("{http://www.w3.org/2005/Atom}entry")) == 2
    upload = step_named(load(SAFEGUARD), "feed", "Upload the leaderboard")
    assert upload["with"]["path"] == "site/"
    empty = tmp_path / "empty"  # no GPU job ran: no artifacts, still a page
    empty.mkdir()
    proc, _, _ = run_step(step, empty)
    assert proc.returncode == 0 and "0 record(s)" in proc.stdout, proc.stderr
    assert (empty / "site" / "leaderboard.html").exists()


def test_the_feed_step_adds_the_results_dataset_from_the_hub(localhub, tmp_path, monkeypatch):
    from bot.publish import feed

    old = feed.record("org/ft-old", SHA, "org/base", "variant", "from an earlier run")
    new = feed.record("org/ft-new", SHA, "org/base", "variant", "this run")
    monkeypatch.setenv("HF_ENDPOINT", localhub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_alice_token")
    feed.push([old, new], "alice/deploy-results")  # `process` appends per candidate
    _artifacts(tmp_path, [[new]])
    step = step_named(load(SAFEGUARD), "feed", "Build the leaderboard and the Atom feed")
    env = {**localhub.env("hf_alice_token"), "SAFEGUARD_PUBLISH_FEED_REPO": "alice/deploy-results"}
    proc, _, _ = run_step(step, tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert "2 record(s)" in proc.stdout
    html = (tmp_path / "site" / "leaderboard.html").read_text()
    assert "org/ft-old" in html and "org/ft-new" in html
    # an unreadable dataset is a warning, and the artifacts still make a leaderboard
    env["SAFEGUARD_PUBLISH_FEED_REPO"] = "alice/no-such-results"
    proc, _, _ = run_step(step, tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert "::warning::" in proc.stdout and "1 record(s)" in proc.stdout


def test_python_steps_are_ruff_clean(tmp_path):
    ruff = tool("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (the dev extra)")
    scripts = [s for _, s in steps(load(SAFEGUARD)) if s.get("shell") == "python"]
    assert len(scripts) == 3
    for i, step in enumerate(scripts):
        (tmp_path / f"step_{i}.py").write_text(step["run"])
    proc = subprocess.run([ruff, "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Dockerfile and build context -------------------------------------------------------------

def test_no_file_names_a_package_index():
    """An index is the user's choice (a build argument, a repository variable): no file names
    one, so an index flag is only ever followed by a variable."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    flag = re.compile(r"(index-url|find-links|trusted-host)[\s=\"']+[a-z]+[:.]", re.I)
    named = [f"{f}: {m.group(0)}" for f in files if (ROOT / f).is_file()
             for m in flag.finditer((ROOT / f).read_text(errors="replace"))]
    assert files and named == []


def test_dockerfile_shape():
    dockerfile_parse = pytest.importorskip(
        "dockerfile_parse", reason="dockerfile-parse is not installed (the dev extra)")
    parser = dockerfile_parse.DockerfileParser(str(DOCKERFILE))
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]
    first_from = next(n for n, (k, _) in enumerate(instructions) if k == "FROM")
    assert ("ARG", "BASE_IMAGE=python:3.11-slim") in instructions[:first_from]
    assert instructions[first_from] == ("FROM", "${BASE_IMAGE}")
    assert [k for k, _ in instructions].count("FROM") == 1
    args = {v.split("=")[0] for k, v in instructions if k == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX", "TORCH_VERSION"} <= args
    assert re.search(r"^ARG TORCH_INDEX=$", DOCKERFILE.read_text(), re.M)  # the user names it
    runs = [v for k, v in instructions if k == "RUN"]
    torch_run = next(r for r in runs if "torch==" in r)
    assert 'export PIP_INDEX_URL="${TORCH_INDEX}"' in torch_run and "${TORCH_VERSION}" in torch_run
    assert runs.index(torch_run) < next(n for n, r in enumerate(runs) if "[postgres]" in r)
    user = [v for k, v in instructions if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    last_run = max(n for n, (k, _) in enumerate(instructions) if k == "RUN")
    assert max(n for n, (k, _) in enumerate(instructions) if k == "USER") > last_run
    assert ("WORKDIR", "/work") in instructions and ("VOLUME", "/work") in instructions
    assert ("ENTRYPOINT", '["safeguard-bot"]') in instructions
    assert ("CMD", '["watch"]') in instructions


def _dockerignore() -> list[tuple[re.Pattern, bool]]:
    """(regex, exclude) per .dockerignore line, in Docker's order (a later `!` re-includes)."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = "".join(".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*")
                        .replace(r"\?", "[^/]") for part in re.split(r"(\*\*)", pattern))
        rules.append((re.compile(regex.replace(".*/", "(.*/)?")), not keep))
    return rules


def _ignored(rel: str, rules) -> bool:
    """Whether Docker leaves `rel` out of the context (a match on the path or a parent)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for regex, exclude in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = exclude
    return ignored


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest():
    rules = _dockerignore()
    for rel in (".venv/bin/python", ".cache/zoo/x", ".git/HEAD", "bot/__pycache__/cli.pyc",
                "safeguard_bot.egg-info/PKG-INFO", "tests/test_deploy.py", ".pytest_cache/x"):
        assert _ignored(rel, rules), rel
    for rel in ("pyproject.toml", "README.md", "bot/cli.py", "templates/model_card.md.j2",
                "bot/zoo/evaluate.toml"):
        assert not _ignored(rel, rules), rel


def test_the_package_builds_from_exactly_what_the_image_copies(tmp_path):
    """COPY's sources, less .dockerignore, make a wheel with the templates and the command."""
    rules = _dockerignore()
    src = tmp_path / "src"
    text = DOCKERFILE.read_text()
    assert 'pip install --no-cache-dir "/tmp/src[postgres]"' in text
    copies = re.findall(r"^COPY (.+) (\S+)$", text, re.M)
    assert copies and all(dest.startswith("/tmp/src") for _, dest in copies)
    for sources, dest in copies:
        dest_dir = src / dest.removeprefix("/tmp/src").strip("/")
        for source in sources.split():
            origin = ROOT / source
            if origin.is_file():  # a file into a folder (dest ends with /)
                assert dest.endswith("/"), dest
                files = [(origin, dest_dir / origin.name)]
            else:  # a folder's contents
                files = [(p, dest_dir / p.relative_to(origin)) for p in origin.rglob("*")]
            for path, target in files:
                if path.is_file() and not _ignored(path.relative_to(ROOT).as_posix(), rules):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target)
    assert (src / "pyproject.toml").exists() and (src / "bot" / "cli.py").exists()
    assert not list(src.rglob("__pycache__"))
    from importlib.metadata import PackageNotFoundError, version

    try:  # build with the venv's setuptools if it is new enough, else pip fetches one
        flags = ["--no-build-isolation"] if int(version("setuptools").split(".")[0]) >= 68 else []
    except PackageNotFoundError:
        flags = []
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *flags, "-q",
                           "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("safeguard_bot-*.whl")))
    names = set(wheel.namelist())
    assert {"bot/cli.py", "bot/templates/leaderboard.html.j2", "bot/zoo/evaluate.toml"} <= names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "safeguard-bot = bot.cli:main" in wheel.read(entry_points).decode()


# --- linters ----------------------------------------------------------------------------------

def test_actionlint():
    actionlint = tool("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed (the dev extra ships it)")
    shellcheck = tool("shellcheck") or ""  # scripts are shellchecked where it is installed
    proc = subprocess.run([actionlint, "-oneline", f"-shellcheck={shellcheck}", "-pyflakes=",
                           str(CI), str(SAFEGUARD)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zizmor():
    zizmor = tool("zizmor")
    if zizmor is None:
        pytest.skip("zizmor is not installed (the dev extra ships it)")
    proc = subprocess.run([zizmor, "--offline", "--no-progress", "--config",
                           str(ROOT / ".github" / "zizmor.yml"), str(CI), str(SAFEGUARD)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the dev extra ships it)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
