"""Publishing one merge: a pull request for an opted-in owner, else a -safeguarded variant.

Each publication is one commit (the Hub applies a commit whole or not at all), so nothing is
half-published if the process dies. Never a second pull request for one revision: the ledger
says whether this revision was published, and the bot's pull requests on the repo (open,
closed or merged) are checked for the revision's marker in their title before the commit and
again after any failed try of it (it may have landed), never retried blindly. A pull request
the owner closed means they declined: nothing is opened again for that revision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bot import __version__, hub, hub_calls
from bot.config import Settings
from bot.discovery import withheld
from bot.errors import GoneError, SafeguardError
from bot.merge.compat import LICENSE_FILES
from bot.publish import card as cards
from bot.publish import licenses

PLOT_FILE = "sweep.png"
# what was done with a selected merge: a pull request on the fine-tune, a variant repo, only a
# line in the feed, or nothing (the sweep found no merge worth publishing)
# "declined": the owner closed the bot's pull request for this revision; "withheld": the repo
# became private, gated or opted out after it was found (not in the feed either)
Decision = Literal["pull-request", "variant", "feed-only", "no-publish", "declined", "withheld"]
PUBLISHED: tuple[Decision, ...] = ("pull-request", "variant")


@dataclass(frozen=True)
class Publication:
    """What `publish` did with a candidate's merge, why, and where it can be seen."""

    decision: Decision
    reason: str
    links: dict[str, str] = field(default_factory=dict)

    @property
    def published(self) -> bool:
        """Weights went to the Hub (a pull request or a variant)."""
        return self.decision in PUBLISHED


def revision_marker(revision: str) -> str:
    return f"@{revision[:8]}"


def publish(candidate, report, merged: Path | None, plot: Path | None,
            settings: Settings, stripped: dict[str, list[str]] | None = None) -> Publication:
    """Publish the selected merge of `candidate` (a watch.Candidate) as config says;
    `stripped`: what the merge removed from copied JSON files as remote code."""
    if not report.selection.publish or merged is None:
        return Publication("no-publish", report.selection.reason)
    action = candidate.action
    if action == "feed-only":
        return Publication("feed-only", "not opted in; publish.unopted is feed-only")
    license_key = None
    if action == "variant":
        card = hub.model_info(candidate.repo, candidate.revision).card_data or {}
        license_key = licenses.license_key(card.get("license") or candidate.license,
                                           card.get("license_name"))
        refused = licenses.variant_refused(license_key, settings.publish.variant_licenses)
        if refused:
            return Publication("feed-only", f"{refused}, so no variant is published")
    refused = withheld(hub.model_info(candidate.repo), settings)  # its head, now
    if refused:
        return Publication("withheld", f"{refused} (since it was found); nothing published")
    common = {"base_repo": candidate.base, "base_revision": _base_revision(candidate.base),
              "finetune_repo": candidate.repo, "finetune_revision": candidate.revision,
              "bot_version": __version__, "templates_dir": settings.publish.templates_dir}
    files: dict[str, Path | bytes] = {p.name: p for p in sorted(merged.iterdir())
                                      if p.is_file() and p.name != "README.md"}
    if plot is not None:
        files[PLOT_FILE] = plot
    if action == "pull-request":
        return _pull_request(candidate, report, files, common, settings)
    return _variant(candidate, report, files, common, settings, license_key, stripped or {})


def _variant(candidate, report, files, common, settings, license_key: str,
             stripped: dict[str, list[str]]) -> Publication:
    """A -safeguarded repo of the bot's, named after the fine-tune and its owner, that carries
    the license files the license asks for; never one the bot did not make from this source."""
    missing = licenses.missing_files(license_key, list(files))
    if missing:
        return Publication("feed-only", f"license {license_key} needs {' and '.join(missing)} "
                                        "beside the model, and neither the fine-tune nor the "
                                        "base has it, so no variant is published")
    owner = settings.publish.variant_owner or hub.whoami()
    repo = licenses.variant_name(owner, candidate.repo, license_key)
    other = _made_from_another(repo, candidate.repo)
    if other:
        return Publication("feed-only", other)
    files["README.md"] = cards.model_card(
        report, license_id=license_key, plot_file=PLOT_FILE, model_name=repo.split("/")[1],
        license_files=sorted(n for n in files if n in LICENSE_FILES), stripped=stripped,
        **common).encode()
    url = hub.publish_repo(repo, files, f"safeguard-bot: {candidate.repo}"
                           f"{revision_marker(candidate.revision)} merged with its base")
    return Publication("variant", report.selection.reason,
                       {"variant": f"{hub.endpoint()}/{repo}", "commit": url})


def _made_from_another(repo: str, source: str) -> str | None:
    """Why the bot may not publish into `repo` (it exists, holds files, and its card is not the
    bot's card for `source`), or None (new, empty, or the bot's variant of `source`)."""
    try:
        info = hub.model_info(repo)
    except GoneError:
        return None
    if not [s for s in info.siblings or [] if s.rfilename != ".gitattributes"]:
        return None
    card = info.card_data or {}
    parents = card.get("base_model") or []
    parents = [parents] if isinstance(parents, str) else parents
    if "safeguard-bot" in (card.get("tags") or []) and source in parents:
        return None
    return f"{repo} exists and was not made by safeguard-bot from {source}; nothing is " \
        "overwritten, so no variant is published"


def _existing_pull_request(repo: str, me: str, marker: str) -> Publication | None:
    """What the bot's pull request for this revision came to, if it has one."""
    for number, title, status in hub.pull_requests_by(repo, me):
        if marker not in title:
            continue
        link = {"pull_request": f"{hub.endpoint()}/{repo}/discussions/{number}"}
        if status == "closed":
            return Publication("declined", f"the owner closed pull request #{number} for this "
                                           "revision", link)
        return Publication("pull-request", f"a pull request for this revision is already "
                                           f"{'merged' if status == 'merged' else 'open'} "
                                           f"(#{number})", link)
    return None


def _pull_request(candidate, report, files, common, settings) -> Publication:
    me = hub.whoami()
    marker = revision_marker(candidate.revision)
    existing = _existing_pull_request(candidate.repo, me, marker)
    if existing is not None:
        return existing
    # the owner's repo keeps its own config and tokenizer: only the weights change (old
    # weight files that the merge does not write are deleted), plus the card section and plot
    files = {name: content for name, content in files.items() if _is_weights(name)
             or name == PLOT_FILE}
    existing = hub.read_text(candidate.repo, "README.md", candidate.revision) or ""
    section = cards.card_section(report, **common)
    files["README.md"] = cards.merge_card(existing, section).encode()
    current = hub.model_info(candidate.repo, candidate.revision).siblings or []
    stale = [s.rfilename for s in current if _is_weights(s.rfilename)
             and s.rfilename not in files]
    title, description = cards.pull_request_text(report, opt_in_tag=settings.watch.opt_in_tag,
                                                 **common)
    try:
        _, url = hub.open_pull_request(candidate.repo, files, f"{title} {marker}", description,
                                       parent_commit=candidate.revision, delete=stale)
        return Publication("pull-request", report.selection.reason, {"pull_request": url})
    except SafeguardError as e:
        if not e.transient:
            raise
        # the commit may have landed, or may still land (a request that timed out here can
        # still be running there): look for it, and never commit again within this claim;
        # if it does not show up, the candidate is deferred and its next claim looks first
        for attempt in range(1, hub_calls.attempts() + 1):
            time.sleep(hub_calls.backoff_seconds(attempt))
            landed = _existing_pull_request(candidate.repo, me, marker)
            if landed is not None:
                return landed
        raise


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json")) or \
        name == "adapter_config.json"


def _base_revision(base: str) -> str:
    return hub.model_info(base).sha or "main"
