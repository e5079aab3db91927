"""What the command line shows people: one JSON object, or tables and lines on stderr.

`err` is the one console for everything that is not the result's JSON (progress, tables,
errors), so `--json` output on stdout stays parseable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from bot.results import CandidateOutcome, CycleResult, DemoResult

err = Console(stderr=True, soft_wrap=True)


def emit(result, as_json: bool, human: Callable[[Any], None]) -> None:
    """One JSON object on stdout (a result's `to_dict()`, or the dict itself), or `human`'s
    rendering of the result on stderr."""
    if as_json:
        print(json.dumps(result if isinstance(result, dict) else result.to_dict()))
    else:
        human(result)


def log_to_stderr(quiet: bool) -> Callable[[str], None]:
    """Progress messages on stderr, as they are (no markup), or none with --json."""
    if quiet:
        return lambda _: None
    return lambda message: err.print(message, markup=False, highlight=False)


def print_demo(r: DemoResult) -> None:
    from rich.table import Table

    from bot.results import Processed

    print_cycle(r.cycle)
    table = Table(title="merged and published")
    for column in ("fine-tune", "decision", "lambda", "ASR before", "ASR after", "retention",
                   "link"):
        table.add_column(column)
    for p in r.cycle.processed:
        if not isinstance(p, Processed):
            continue
        link = next(iter(p.publication.links.values()), "")
        table.add_row(p.repo, p.publication.decision, str(p.selection.weight),
                      f"{p.asr.finetune:.2f}",
                      "" if p.asr.merged is None else f"{p.asr.merged:.2f}",
                      "" if p.retention is None else f"{p.retention:.2f}", link)
    if table.rows:
        err.print(table)
    err.print(f"demo done in {r.total_seconds} s; browse the hub with `safeguard-bot hub "
              f"serve {r.hub}`; run the demo again and nothing new is published.",
              markup=False)



def print_sweep(r: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{r['method']} merge of {r['base']} and {r['finetune']}")
    for column in ("lambda", "ASR", "over-refusal", "task", "retention"):
        table.add_column(column, justify="right")
    chosen = r["selection"]["weight"]
    for p in [r["base_point"], *r["points"], r["finetune_point"]]:
        mark = " *" if p["weight"] == chosen else ""
        table.add_row(f"{p['weight']}{mark}", f"{p['asr']:.2f}", f"{p['over_refusal']:.2f}",
                      f"{p['task']:.2f}", f"{p['retention']:.2f}")
    err.print(table)
    verdict = "publish" if r["selection"]["publish"] else "no publish"
    err.print(f"{verdict}: {r['selection']['reason']}", markup=False)
    err.print(f"task: {r['task']}; judge: {r['judge']}; {r['timings']['total_seconds']} s",
              markup=False)
    if "report" in r:
        err.print(f"report: {r['report']}, plot: {r['plot']}", markup=False)


def outcome_line(outcome: CandidateOutcome) -> str:
    """One candidate's outcome for people: status, decision, reason, links."""
    from bot.results import Processed

    line = f"{outcome.repo}@{outcome.revision[:8]}: {outcome.status}"
    links: dict[str, str] = {}
    if isinstance(outcome, Processed):
        line += f" ({outcome.publication.decision})"
        links = outcome.publication.links
    line += f": {outcome.reason}"
    return line + "".join(f"\n    {k}: {v}" for k, v in links.items())


def print_cycle(r: CycleResult) -> None:
    found = r.discovery
    err.print(f"{len(found.candidates)} new candidate(s), {len(found.skips)} skipped, "
              f"{found.already_seen} already seen, {found.deferred} deferred; "
              f"{len(r.processed)} processed ({r.seconds} s)", markup=False)
    for c in found.candidates:
        if getattr(c, "via", None):
            err.print(f"  found {c.repo}@{c.revision[:8]} through {c.via}, a copy of {c.base}",
                      markup=False)
    for s in found.skips:
        err.print(f"  skip {s.repo}@{s.revision[:8]}: {s.reason}", markup=False)
    for x in found.later:
        err.print(f"  later {x.repo}@{x.revision[:8]}: {x.reason}", markup=False)
    for error in found.errors:
        err.print(f"  error {error}", markup=False)
    for p in r.processed:
        err.print("  " + outcome_line(p), markup=False)
