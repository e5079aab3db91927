"""Discovery: new fine-tunes and adapters of the watched bases, as candidates or skips.

For each watched base and relation (finetune, adapter), the newest repos that declare the base
(`base_model:<relation>:<base>` tags, which the Hub derives from model cards) are examined once
per revision; so are those that declare a copy of it (a quantization, an alias: bot/ancestry.py),
as candidates of the watched base with the copy recorded (`via`). A repo that cannot or should
not be merged is a Skip with a reason a person understands. One the bot could not judge now
(the Hub failed for a while, or examining it raised) is a Later: queued with a retry time, never
a skip. Nothing here raises for one repo, and a base whose listing fails is an error line, not
the end of the cycle. A watched base this token cannot read (gated, its license not accepted)
is one error line too, and its fine-tunes are left unexamined and unrecorded: found again next
cycle, never claimed, no attempt used. Card text is never trusted: only the Hub's derived tags,
the file list and the JSON configs are read.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from bot import hub
from bot.ancestry import Ancestry
from bot.config import Settings
from bot.errors import GoneError, SafeguardError, TransientHubError
from bot.merge.compat import PICKLE_SUFFIXES, architecture_mismatch
from bot.results import FieldsAsJson

log = logging.getLogger("safeguard")

QUANTIZED_FILES = (".gguf", ".ggml")

Kind = Literal["model", "adapter"]  # full weights, or a LoRA adapter
# what publishing will do: a pull request (the owner opted in), a -safeguarded variant, or only
# a line in the results feed (publish.unopted)
Action = Literal["pull-request", "variant", "feed-only"]


@dataclass(frozen=True)
class Candidate(FieldsAsJson):
    """A fine-tune (or adapter) worth processing at this revision."""

    repo: str
    revision: str
    base: str
    kind: Kind
    action: Action
    size_bytes: int
    license: str | None
    last_modified: str | None
    via: str | None = None  # the copy of `base` (a quantization, an alias) it declares


@dataclass(frozen=True)
class Skip(FieldsAsJson):
    """A repo at a revision that will not be processed, and why (in words a person reads)."""

    repo: str
    revision: str
    base: str
    kind: Kind
    reason: str
    via: str | None = None  # the copy of `base` (a quantization, an alias) it declares


@dataclass(frozen=True)
class Later(Skip):
    """A repo at a revision that could not be judged now (the Hub failed for a while, or
    examining it raised): not a skip, but queued with a retry time and judged again when it is
    claimed. Its fields are a Skip's."""


@dataclass(frozen=True)
class Discovery:
    candidates: list[Candidate]
    skips: list[Skip]
    already_seen: int  # repos at a revision the ledger knows
    deferred: int  # new candidates past the cycle's limit (found again next cycle)
    later: list[Later] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # listings that failed (tried next cycle)

    def to_dict(self) -> dict:
        return {"candidates": [c.to_dict() for c in self.candidates],
                "skips": [s.to_dict() for s in self.skips],
                "already_seen": self.already_seen, "deferred": self.deferred,
                "later": [x.to_dict() for x in self.later], "errors": self.errors}


def one_line(e: BaseException) -> str:
    """An error as one printable line: the bot's own message, else its type and first line."""
    text = str(e).splitlines()[0] if str(e).strip() else ""
    return printable(text if isinstance(e, SafeguardError)
                     else f"{type(e).__name__}: {text}".rstrip(": "))


def printable(text: str, limit: int = 500) -> str:
    """Text from strangers (config values, error messages) made safe to print in a log, a
    CI summary or a feed: no control characters (no new lines, no terminal escapes), no
    "::" (a GitHub Actions workflow command), at most `limit` characters."""
    text = "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)
    text = text.replace("::", ": :").strip()
    return text if len(text) <= limit else text[:limit - 3] + "..."


def discover(settings: Settings,
             is_known: Callable[[str, str], bool] = lambda repo, revision: False) -> Discovery:
    """Examine the newest fine-tunes of every watched base and of its copies; `is_known(repo,
    sha)`: whether the ledger has that revision already (it is counted, not examined again)."""
    w = settings.watch
    cycle = _Cycle(settings, is_known)
    for base in w.bases:
        for declared, via in cycle.sources(base):
            for relation in w.relations:
                if base in cycle.unreadable:
                    break
                try:
                    listing = hub.list_finetunes(declared, relation, w.scan_per_base)
                except SafeguardError as e:  # this one waits for the next cycle; others go on
                    cycle.errors.append(f"listing {relation}s of {declared}: {e}")
                    continue
                for info in listing:
                    cycle.take(info, base, relation, via)
    return Discovery(cycle.candidates, cycle.skips, cycle.already, cycle.deferred, cycle.later,
                     cycle.errors)


class _Cycle:
    """One discovery cycle: what it found, and what it asked the Hub once (base configs,
    copies)."""

    def __init__(self, settings: Settings, is_known: Callable[[str, str], bool]) -> None:
        self.settings, self.is_known = settings, is_known
        self.ancestry = Ancestry(settings.watch)
        self.candidates: list[Candidate] = []
        self.skips: list[Skip] = []
        self.later: list[Later] = []
        self.errors: list[str] = []
        self.already = self.deferred = 0
        self.examined: set[tuple[str, str]] = set()
        self.base_configs: dict[str, dict | None] = {}
        self.unreadable: set[str] = set()

    def sources(self, base: str):
        """(declared base, via) whose fine-tunes are `base`'s: the base itself, then its
        copies (listed only once the base's own listings are done, and only if it is read)."""
        yield base, None
        if base in self.unreadable:
            return
        try:
            copies = self.ancestry.copies(base)
        except SafeguardError as e:
            self.errors.append(f"listing copies of {base}: {e}")
            return
        for copy in copies:
            yield copy, copy

    def take(self, info, base: str, relation: str, via: str | None) -> None:
        """Count, examine and file one listed repo."""
        w, sha = self.settings.watch, info.sha or ""
        if (info.id, sha) in self.examined:
            return
        if self.is_known(info.id, sha):
            self.examined.add((info.id, sha))
            self.already += 1
            return
        if len(self.candidates) >= w.max_candidates:
            self.examined.add((info.id, sha))
            self.deferred += 1
            return
        if not self._readable(base):
            return  # not recorded: found again next cycle
        self.examined.add((info.id, sha))
        try:
            found = examine(info, base, relation, self.base_configs[base], self.settings,
                            via=via)
        except Exception as e:  # noqa: BLE001 - one repo never stops the cycle
            if not getattr(e, "transient", False):
                log.warning(f"examining {info.id}@{sha[:8]} failed", exc_info=True)
            kind = "adapter" if relation == "adapter" else "model"
            self.later.append(Later(info.id, sha, base, kind, one_line(e), via))
            return
        if isinstance(found, Skip):
            self.skips.append(found)
        elif sum(c.size_bytes for c in self.candidates) + found.size_bytes \
                > w.max_cycle_gb * 1e9 and self.candidates:
            self.deferred += 1  # this cycle's byte budget is spent; found again next time
        else:
            self.candidates.append(found)

    def _readable(self, base: str) -> bool:
        """Whether the base's config.json could be read (kept for the cycle); if not, one
        error line says why, and the base's fine-tunes wait."""
        if base not in self.base_configs and base not in self.unreadable:
            try:
                self.base_configs[base] = hub.read_json(base, "config.json")
            except SafeguardError as e:
                self.unreadable.add(base)
                self.errors.append(unreadable_base(base, e))
        return base in self.base_configs


def unreadable_base(base: str, e: SafeguardError) -> str:
    """Why the fine-tunes of `base` wait: its config.json could not be read."""
    if e.transient:
        return f"base {base} could not be read now: its fine-tunes wait ({e})"
    if isinstance(e, GoneError):
        return f"base {base} is not on the Hub, or private: its fine-tunes wait ({e})"
    return (f"base {base} cannot be read with this token (gated, license not accepted?): its "
            f"fine-tunes wait ({e})")


def _definitive(e: SafeguardError) -> SafeguardError:
    """`e` if it is an answer about the repo; a transient failure is raised instead."""
    if e.transient:
        raise e
    return e


def _base_config(base: str) -> dict | None:
    """The base's config.json (None: it has none). A base this token may not read (gated)
    raises a transient error: its fine-tunes wait, and use no attempt; one that is gone
    raises GoneError."""
    try:
        return hub.read_json(base, "config.json")
    except SafeguardError as e:
        if e.transient or isinstance(e, GoneError):
            raise
        raise TransientHubError(unreadable_base(base, e)) from None


def examine(info, base: str, relation: str, base_config: dict | None,
            settings: Settings, detail=None, via: str | None = None) -> Candidate | Skip:
    """Decide one repo at one revision: `info` from the listing, `detail` its model_info with
    file sizes (fetched here when not given); `via`: the copy of `base` it declares."""
    repo = info.id
    kind = "adapter" if relation == "adapter" else "model"

    def skip(reason: str) -> Skip:
        return Skip(repo, info.sha or "", base, kind, printable(reason), via)

    refused = withheld(info, settings) or _mlx(info) or (
        "gated, and this token has no access"
        if getattr(info, "gated", False) and not _can_read(repo, info.sha) else None)
    if refused:
        return skip(refused)
    try:
        detail = detail or hub.model_info(repo, revision=info.sha)
    except SafeguardError as e:
        return skip(f"could not read the repo: {_definitive(e)}")
    files = {s.rfilename: (s.size or 0) for s in detail.siblings or []}
    if "adapter_config.json" in files:
        kind = "adapter"
    refused = withheld(detail, settings) or _mlx(detail) \
        or _files_refused(detail, files, {base, via or base}, settings)
    if refused:
        return skip(refused)
    config_name = "adapter_config.json" if kind == "adapter" else "config.json"
    if files.get(config_name, 0) > settings.hub.max_file_mb * 1024**2:
        return skip(f"{config_name} is {files[config_name] / 1e6:.0f} MB, larger than "
                    f"hub.max_file_mb ({settings.hub.max_file_mb:g})")
    try:
        config = hub.read_json(repo, config_name, revision=info.sha)
    except SafeguardError as e:
        return skip(f"could not read {config_name}: {_definitive(e)}")
    if config is None:
        return skip(f"no {config_name}")
    reason = _config_refused(config, base_config) if kind == "model" else None
    if reason:
        return skip(reason)
    opted_in = settings.watch.opt_in_tag in (detail.tags or [])
    action = "pull-request" if opted_in else settings.publish.unopted
    if action == "skip":
        return skip(f"not opted in (no '{settings.watch.opt_in_tag}' tag) and publish.unopted "
                    "is skip")
    modified = getattr(detail, "last_modified", None)
    size = sum(n for f, n in files.items() if f.endswith(".safetensors"))
    return Candidate(repo, detail.sha or info.sha or "", base, kind, action, size,
                     _license(detail), modified.isoformat() if modified else None, via)


def _files_refused(detail, files: dict[str, int], declared: set[str],
                   settings: Settings) -> str | None:
    """Why a repo's files, tags or license rule it out (no safetensors weights, a declared
    quantization of `declared`, a no-derivatives license, too large), or None."""
    w = settings.watch
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        return _without_safetensors([f.lower() for f in files])
    if any(f"base_model:quantized:{b}" in (detail.tags or []) for b in declared):
        return "quantized (declared base_model_relation: quantized)"
    license_id = _license(detail)
    if license_id and license_id.lower() in w.no_derivatives_licenses:
        return f"license {license_id} forbids derivatives"
    size = sum(files[f] for f in weights)
    if size > w.max_model_gb * 1e9:
        return f"larger than the size limit ({size / 1e9:.1f} GB > {w.max_model_gb} GB)"
    return None


def _mlx(info) -> str | None:
    """An MLX quantization (the Hub's `mlx` library tag): its weights are not the base's."""
    if getattr(info, "library_name", None) == "mlx" or "mlx" in (info.tags or []):
        return "quantized (MLX)"
    return None


def _without_safetensors(names: list[str]) -> str:
    """Why a repo without safetensors weights is skipped, from its (lower-case) file names."""
    if any(n.endswith(QUANTIZED_FILES) for n in names):
        return "quantized (GGUF), no full-precision safetensors weights"
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        return "only pickle weights (.bin/.pt), which the bot never loads"
    return "no weights in safetensors format"


def withheld(detail, settings: Settings) -> str | None:
    """Why the owner's wishes keep this repo out (private, gated, opted out), or None; asked at
    discovery and again, of the repo's head, just before publishing."""
    w = settings.watch
    if getattr(detail, "private", False):
        return "private: the bot never republishes a private repo"
    if getattr(detail, "gated", False) and not w.include_gated:
        return "gated (watch.include_gated is off)"
    if w.opt_out_tag in (detail.tags or []):
        return f"opted out (tagged '{w.opt_out_tag}')"
    return None


def _config_refused(config: dict, base_config: dict | None) -> str | None:
    """Why a full model's config.json rules it out (remote code, quantized, another
    architecture than the base's), or None."""
    if "auto_map" in config:
        return "needs remote code (auto_map in config.json), which the bot never runs"
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        return f"quantized ({quant.get('quant_method', 'quantization_config')})"
    if "quantization" in config:  # mlx-lm writes its bits and group size here
        return "quantized (MLX)"
    return architecture_mismatch(config, base_config)


def _can_read(repo: str, revision: str | None) -> bool:
    try:
        hub.read_json(repo, "config.json", revision=revision)
        return True
    except SafeguardError as e:
        _definitive(e)
        return False


def _license(detail) -> str | None:
    card = getattr(detail, "card_data", None)
    value = card.get("license") if card is not None else None
    if isinstance(value, str):
        return value
    tag = next((t for t in detail.tags or [] if t.startswith("license:")), None)
    return tag.removeprefix("license:") if tag else None


def candidate_for(repo: str, revision: str | None, settings: Settings,
                  ancestry: Ancestry | None = None) -> Candidate | Skip:
    """One repo at one revision (default: its head), judged as discovery would; its base is
    the one its card declares (the Hub's base_model:finetune:/adapter: tag), or the watched
    base that one is a copy of (bot/ancestry.py)."""
    info = hub.model_info(repo, revision)
    for relation in ("finetune", "adapter"):
        prefix = f"base_model:{relation}:"
        declared = next((t.removeprefix(prefix) for t in info.tags or []
                         if t.startswith(prefix)), None)
        if declared:
            base, via = (ancestry or Ancestry(settings.watch)).resolve(declared)
            return examine(info, base, relation, _base_config(base), settings, detail=info,
                           via=via)
    return Skip(repo, info.sha or "", "", "model",
                "its card declares no base model (base_model: in the README metadata)")
