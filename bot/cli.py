"""The command line: parse, call one function, print. Errors become one line and an exit code."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from bot import __version__
from bot.cli_output import (
    emit,
    err,
    log_to_stderr,
    outcome_line,
    print_cycle,
    print_demo,
    print_sweep,
)
from bot.errors import SafeguardError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Restore the safety of fine-tuned chat models by merging with their base.")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object, no progress.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="Settings file (TOML).")]
SetOptions = Annotated[list[str] | None, typer.Option(
    "--set", help="Change a setting: SECTION.KEY=VALUE, e.g. --set watch.bases=org/base-it.")]
Progress = Callable[..., None]  # (done, total[, what])
WorkDir = Annotated[Path, typer.Option(
    "--workdir", help="Where the ledger, reports and feed live.")]


def _known_method(name: str | None) -> str | None:
    """--method checked against the merge registry (imported only when the option is given)."""
    if name is None:
        return None
    from bot.merge.methods import method_named

    return method_named(name).name


MethodOption = typer.Option(
    callback=_known_method, help="Merge method: a name in the registry of bot/merge/methods.py "
    "(an unknown name is refused with the list); default linear.")


@contextmanager
def _progress(label: str, quiet: bool, in_bytes: bool = False) -> Iterator[Progress | None]:
    """A progress bar on stderr, or nothing when quiet or not a terminal. It is called with
    (done, total) or (done, total, what is being done); `in_bytes`: done and total are bytes
    (a download or a merge), else steps."""
    if quiet or not err.is_terminal:
        yield None
        return
    counts = (DownloadColumn(), TimeRemainingColumn()) if in_bytes else \
        ("{task.completed}/{task.total}",)
    with RichProgress("[progress.description]{task.description}", BarColumn(), *counts,
                      console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int, what: str | None = None) -> None:
            bar.update(task, completed=done, total=total,
                       description=f"{label}: {what}" if what else label)

        yield update


@app.command()
def merge(
    base: Annotated[str, typer.Argument(help="Base model: a directory or org/name[@rev].")],
    finetune: Annotated[str, typer.Argument(help="Fine-tune or LoRA adapter: directory or id.")],
    out: Annotated[Path, typer.Argument(help="Output directory (must not exist).")],
    method: Annotated[str, MethodOption] = "linear",
    weight: Annotated[float, typer.Option(help="Lambda: the fine-tune's weight in [0, 1].")] = 0.5,
    density: Annotated[float | None, typer.Option(
        help="Share of the task vector kept, for the methods that take a density "
        "(default 0.5).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed, for the methods that draw "
                                           "random masks.")] = 0,
    dtype: Annotated[str | None, typer.Option(
        help="Output dtype: float32, float16 or bfloat16 (default: the fine-tune's).")] = None,
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB.")] = "5GB",
    device: Annotated[str, typer.Option(help="Where the maths runs: cpu or cuda.")] = "cpu",
    as_adapter: Annotated[bool, typer.Option(
        "--as-adapter", help="With a LoRA FINETUNE: write a rescaled adapter, not a model.")]
    = False,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Accept .bin/.pt weights (loaded with weights_only=True).")]
    = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
    = False,
    as_json: JsonFlag = False,
) -> None:
    """Merge BASE and FINETUNE into OUT: lambda = --weight is the fine-tune's share."""
    from bot.merge.engine import MergeRequest
    from bot.stages import merge_refs

    req = MergeRequest(base, finetune, out, method, weight, density, seed, dtype, shard_size,
                       device, as_adapter, allow_pickle, overwrite)
    with _progress("merging", as_json, in_bytes=True) as progress:
        result = merge_refs(req, progress=progress, quiet=as_json)
    emit(result, as_json, lambda r: err.print(
        f"merged {r.merged_tensors}/{r.tensors} tensors ({r.method}, lambda {r.weight}) "
        f"into {r.out}: {len(r.files)} file(s), {r.bytes / 1e6:.1f} MB in {r.seconds:.1f} s"))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the hub, ledger, reports and feed go.")]
    = Path("safeguard-demo"),
    zoo: Annotated[Path | None, typer.Option(
        help="Zoo directory (default WORKDIR/zoo; built once, then reused).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """The embedded default: zoo, local hub, seeded fine-tunes and decoys, one watch cycle.

    No network: the Hub is bot/localhub on 127.0.0.1. A second run finds nothing new.
    """
    from bot.demo import run_demo

    _quiet_libraries()
    with _local_hub_errors():
        result = run_demo(workdir, zoo, log=log_to_stderr(as_json))
    emit(result, as_json, print_demo)


@app.command()
def sweep(
    base: Annotated[str, typer.Argument(help="Base model: a directory or org/name[@rev].")],
    finetune: Annotated[str, typer.Argument(help="Fine-tune or LoRA adapter: directory or id.")],
    grid: Annotated[str | None, typer.Option(
        help="Lambdas to evaluate, e.g. 0.2,0.4,0.5,0.6,0.8 (default from settings).")] = None,
    method: Annotated[str | None, MethodOption] = None,
    report: Annotated[Path | None, typer.Option(
        help="Write the report here (JSON with the raw generations) and its plot (.png).")]
    = None,
    config: ConfigFile = None,
    overrides: SetOptions = None,
    as_json: JsonFlag = False,
) -> None:
    """Evaluate the merge at every lambda of a grid, choose the best trade-off, explain it."""
    from transformers.utils import logging as hf_logging

    from bot.config import load_settings
    from bot.evaluate.sweep import write_report
    from bot.stages import sweep_refs

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    extra = [f"sweep.grid={grid}"] if grid else []
    extra += [f"sweep.method={method}"] if method else []
    settings = load_settings(config, [*(overrides or []), *extra])
    with _progress("sweep", as_json) as progress:
        result = sweep_refs(base, finetune, settings, progress)
    out = result.to_dict()
    if report:
        json_path, png_path = write_report(result, report)
        out["report"], out["plot"] = str(json_path), str(png_path)
    emit(out, as_json, print_sweep)


hub_app = typer.Typer(no_args_is_help=True, help="The local Hub-compatible server.")


@contextmanager
def _local_hub_errors() -> Iterator[None]:
    """The local hub's own errors as the bot's: a bad argument exits 2, the rest as Hub errors."""
    from bot.errors import HubError, UsageError
    from bot.localhub import LocalHubError, LocalHubUsageError

    try:
        yield
    except LocalHubUsageError as e:
        raise UsageError(str(e)) from e
    except LocalHubError as e:
        raise HubError(str(e)) from e
app.add_typer(hub_app, name="hub")


@hub_app.command("serve")
def hub_serve(
    directory: Annotated[Path, typer.Argument(help="Where the hub keeps its repos (reused).")],
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 0,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    users: Annotated[list[str] | None, typer.Option(
        "--user", help="Add a user: NAME:TOKEN[:ORG1,ORG2] (repeatable).")] = None,
    faults: Annotated[list[str] | None, typer.Option(
        "--fault", help="Misbehave on purpose (repeatable; the first that fires wins): one of "
        "status=CODE, hang=SECONDS or drop, plus path=REGEX, method=GET, first=N, "
        "probability=P, seed=S, reset=SECONDS (429), comma-separated; e.g. "
        "status=429,path=^/api/models,first=3,reset=2.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Serve DIR as a Hub API (HF_ENDPOINT=URL; uploads need HF_HUB_DISABLE_XET=1) until Ctrl-C."""
    from bot.errors import UsageError
    from bot.localhub import Fault, LocalHub

    with _local_hub_errors():
        parsed = [Fault.parse(spec) for spec in faults or []]  # before touching DIR
        hub = LocalHub(directory)
        for fault in parsed:
            hub.add_fault(fault)
        for spec in users or []:
            name, _, rest = spec.partition(":")
            token, _, orgs = rest.partition(":")
            if not name or not token:
                raise UsageError(f"--user wants NAME:TOKEN[:ORG1,ORG2], not {spec!r}")
            hub.add_user(name, token, [o for o in orgs.split(",") if o])
        hub.start(port, host)
    if as_json:
        print(json.dumps({"url": hub.url, "directory": str(directory)}), flush=True)
    err.print(f"local hub serving {directory} at {hub.url} (Ctrl-C stops it)", markup=False)
    for fault in parsed:
        err.print(f"fault: {fault}", markup=False, highlight=False)
    try:
        hub.wait()
    except KeyboardInterrupt:
        err.print("local hub stopped", markup=False)
    finally:
        hub.stop()


zoo_app = typer.Typer(no_args_is_help=True, help="The zoo: tiny models built on CPU.")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    directory: Annotated[Path, typer.Argument(help="Where the zoo goes (reused if current).")],
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Change a recipe field, e.g. --set base_steps=900 (for experiments).")]
    = None,
    as_json: JsonFlag = False,
) -> None:
    """Build the tiny safety-aligned base, its fine-tunes and a guard; print their metrics."""
    from transformers.utils import logging as hf_logging

    from bot.zoo.build import Recipe, build_zoo

    hf_logging.disable_progress_bar()
    recipe = Recipe.with_overrides(overrides or [])
    report = build_zoo(directory, recipe, force=force, log=log_to_stderr(as_json))

    def human(r: dict) -> None:
        cached = " (cached)" if r["cached"] else ""
        err.print(f"zoo in {directory}{cached}, built in {r['build_seconds']} s")
        for name, m in r["models"].items():
            shown = {k: v for k, v in m.items() if k != "curve"}
            err.print(f"  {name}: {shown}")
            for point in m.get("curve", []):
                err.print(f"      lambda {point['weight']}: {point}")

    emit(report, as_json, human)


@app.command()
def run(
    once: Annotated[bool, typer.Option("--once", help="Run one cycle and exit.")] = False,
    discover_only: Annotated[bool, typer.Option(
        "--discover-only", help="Only find and record candidates; process nothing.")] = False,
    workdir: WorkDir = Path("safeguard-work"),
    config: ConfigFile = None,
    overrides: SetOptions = None,
    as_json: JsonFlag = False,
) -> None:
    """One watch cycle: find new fine-tunes of the watched bases, process, publish, feed.

    The Hub is HF_ENDPOINT (the local hub in tests and the demo); the token is HF_TOKEN.
    """
    from bot.config import load_settings
    from bot.pipeline import run_once

    if not once:
        raise typer.BadParameter("give --once (the daemon is `safeguard-bot watch`)")
    _quiet_libraries()
    settings = load_settings(config, overrides or [])
    with _stop_on_sigterm(settings, workdir) as stopping:
        result = run_once(settings, workdir, discover_only, log=log_to_stderr(as_json),
                          stop=stopping.is_set)
    emit(result, as_json, print_cycle)


@app.command()
def watch(
    workdir: WorkDir = Path("safeguard-work"),
    config: ConfigFile = None,
    overrides: SetOptions = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines.")] = False,
    max_cycles: Annotated[int | None, typer.Option(
        help="Stop after this many cycles (default: run until SIGTERM).")] = None,
) -> None:
    """The daemon: a watch cycle on the configured interval or cron, until SIGTERM."""
    from bot.config import load_settings
    from bot.daemon import configure_logging
    from bot.daemon import watch as run_daemon

    _quiet_libraries()
    configure_logging(log_json)
    run_daemon(load_settings(config, overrides or []), workdir, max_cycles)


@app.command()
def process(
    ref: Annotated[str, typer.Argument(help="The fine-tune: org/name[@revision].")],
    workdir: WorkDir = Path("safeguard-work"),
    config: ConfigFile = None,
    overrides: SetOptions = None,
    as_json: JsonFlag = False,
) -> None:
    """One candidate end to end: checks, sweep, merge, publish, feed, ledger.

    Exits 0 when the candidate was published, skipped or is another worker's; 1 when it failed;
    75 (try again later) when it was deferred: the Hub failed for a while, the disk is short,
    or SIGTERM released it."""
    from bot.config import load_settings
    from bot.pipeline import process_one

    _quiet_libraries()
    settings = load_settings(config, overrides or [])
    with _stop_on_sigterm(settings, workdir) as stopping:
        result = process_one(ref, settings, workdir, log=log_to_stderr(as_json),
                             stop=stopping.is_set)
    emit(result, as_json, lambda r: err.print(outcome_line(r), markup=False))
    if result.status in PROCESS_EXIT:
        raise typer.Exit(PROCESS_EXIT[result.status])


PROCESS_EXIT = {"failed": 1, "deferred": 75}  # `process`: statuses that are not success


@contextmanager
def _stop_on_sigterm(settings, workdir: Path) -> Iterator[threading.Event]:
    """An event set by SIGTERM for the duration: the command stops at its next step and
    releases its candidate, instead of dying with the entry left running. A step still running
    daemon.grace_seconds later (a Hub call that hangs) does not hold the exit up: the
    candidate is released from another thread and the process exits 143."""
    from bot.pipeline import release_held

    stopping = threading.Event()

    def give_up() -> None:
        released = release_held(settings, workdir)
        err.print(f"stopped: a step still ran {settings.daemon.grace_seconds:g} s after "
                  f"SIGTERM; released {released} candidate(s)", markup=False)
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)

    deadline = threading.Timer(settings.daemon.grace_seconds, give_up)
    deadline.daemon = True

    def on_sigterm(*_: object) -> None:
        if not stopping.is_set():
            stopping.set()
            deadline.start()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stopping
    finally:
        deadline.cancel()
        signal.signal(signal.SIGTERM, previous)


def _quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    from bot import hub

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    hub.hide_progress_bars()


@app.command("serve-webhooks")
def serve_webhooks(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one).")] = 8080,
    workdir: WorkDir = Path("safeguard-work"),
    config: ConfigFile = None,
    overrides: SetOptions = None,
    as_json: JsonFlag = False,
) -> None:
    """Receive Hub webhooks and queue each new model revision in the ledger, until Ctrl-C.

    The secret is webhooks.secret or SAFEGUARD_WEBHOOK_SECRET (required). `run --once` or
    `watch` processes what is queued. One JSON line per request on stderr; SIGTERM stops it.
    """
    from bot.config import load_settings
    from bot.webhooks import WebhookServer, resolve_secret

    settings = load_settings(config, overrides or [])
    server = WebhookServer(settings, workdir, resolve_secret(settings), host, port,
                           log=log_to_stderr(quiet=False))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    server.start()
    if as_json:
        print(json.dumps({"url": server.url, "workdir": str(workdir)}), flush=True)
    err.print(f"serving Hub webhooks at {server.url} (Ctrl-C stops)", markup=False)
    try:
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    err.print("webhook server stopped", markup=False)


@app.command()
def version() -> None:
    """Print the bot's version."""
    print(__version__)


def main() -> None:
    """Entry point: the bot's own errors become one line (or a JSON object) and an exit code.

    Usage errors and Ctrl-C are handled by typer (exit 2 and exit 130). After a command that
    succeeded, the process ends without the interpreter's teardown of torch and friends
    (about 0.35 s here, a seventh of a 1 GB merge): output is flushed and every file the command
    wrote is already closed.
    """
    try:
        app()
    except SafeguardError as e:
        if "--json" in sys.argv:
            print(json.dumps({"error": str(e), "kind": type(e).__name__,
                              "exit_code": e.exit_code}))
        err.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(e.exit_code)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
