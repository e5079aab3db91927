"""What each license lets the bot do with a variant: one table of data, keyed by the license id
the Hub uses (a repo's `license:`, or its `license_name:` when `license: other`).

A rule says whether a merged derivative may be redistributed at all, the prefix its name must
start with, the license files that must travel with it (patterns, each matched by a carried
file; the merge carries the fine-tune's LICENSE_FILES, else the base's), and a notice the card
shows. A license with no rule here is
unknown: its fine-tunes go to the results feed only, never to a variant.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class LicenseRule:
    redistribute: bool  # may a merged derivative be published at all
    hub_id: bool = True  # the Hub knows the id (else the card says other + license_name)
    name_prefix: str = ""  # a derivative's name must start with it
    required: tuple[str, ...] = ()  # file name patterns; each must match a carried file
    notice: str = ""  # shown in the card's license line


_PERMISSIVE = LicenseRule(True)
_LLAMA = LicenseRule(True, name_prefix="Llama", required=("LICENSE*", "USE_POLICY.md"),
                     notice="Built with Llama.")
RULES: dict[str, LicenseRule] = {
    **{key: _PERMISSIVE for key in (
        "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "unlicense", "cc-by-4.0",
        "cc-by-sa-4.0", "openrail", "openrail++", "creativeml-openrail-m",
        "bigscience-openrail-m", "bigcode-openrail-m")},
    "llama2": LicenseRule(True, required=("LICENSE*",), notice=(
        "Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta Platforms, "
        "Inc. All Rights Reserved.")),
    "llama3": LicenseRule(True, name_prefix="Llama-3", required=_LLAMA.required,
                          notice="Built with Meta Llama 3."),
    "llama3.1": _LLAMA,
    "llama3.2": _LLAMA,
    "llama3.3": _LLAMA,
    "gemma": LicenseRule(True, notice=(
        "Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms; its use restrictions apply to this model too.")),
    "qwen": LicenseRule(True, hub_id=False, required=("LICENSE*",),
                        notice="Built with Qwen."),
    # non-commercial: in the table, but not among publish.variant_licenses by default
    "qwen-research": LicenseRule(True, hub_id=False, required=("LICENSE*",),
                                 notice="Built with Qwen; for non-commercial use only."),
    **{key: LicenseRule(False) for key in (
        "cc-by-nd-4.0", "cc-by-nc-nd-4.0", "cc-by-nd-3.0", "cc-by-nc-nd-3.0")},
}
# published as variants unless publish.variant_licenses says otherwise
DEFAULT_VARIANT_LICENSES = [key for key, rule in RULES.items()
                            if rule.redistribute and key != "qwen-research"]


def license_key(license_id: object, license_name: object = None) -> str | None:
    """The table's key for a repo's declared license: `license_name` when the license is
    `other`, else the license id; lower-case; None when nothing usable is declared."""
    value = license_name if str(license_id).strip().lower() == "other" else license_id
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().lower()


def variant_refused(key: str | None, allowed: list[str]) -> str | None:
    """Why no variant may be published under license `key` (None: it may be)."""
    rule = RULES.get(key or "")
    if rule is None:
        return f"license {key or 'unknown'} has no rule in the bot's license table"
    if not rule.redistribute:
        return f"license {key} does not allow redistributing a derivative"
    if key not in allowed:
        return f"license {key} is not in publish.variant_licenses"
    return None


def missing_files(key: str, carried: list[str]) -> list[str]:
    """The license's required file patterns that no carried file matches."""
    return [pattern for pattern in RULES[key].required
            if not any(fnmatch.fnmatch(name, pattern) for name in carried)]


def variant_name(owner: str, source: str, key: str | None, limit: int = 96) -> str:
    """The variant repo for `source` (owner/name): `<owner>/<prefix><source owner>__<name>-
    safeguarded`, within the Hub's 96 characters (a longer name is cut and keeps a hash of
    the source, so two sources never share a variant). The Hub forbids `--` in repo ids, so
    the owner and name are joined by `__` (Hub account names have no `_`)."""
    import hashlib

    rule = RULES.get(key or "")
    prefix = rule.name_prefix if rule else ""
    stem = source.replace("/", "__")
    if prefix and not stem.lower().startswith(prefix.lower()):
        stem = f"{prefix}-{stem}"
    suffix = "-safeguarded"
    if len(stem) + len(suffix) > limit:
        digest = hashlib.sha256(source.encode()).hexdigest()[:8]
        stem = stem[:limit - len(suffix) - len(digest) - 1].rstrip("-_.") + "-" + digest
    return f"{owner}/{stem}{suffix}"
