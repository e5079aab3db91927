"""Fault injection: make the local hub misbehave on purpose (errors, rate limits, stalls, drops).

A `Fault` says which requests it hits (a regex on the URL path, a method) and how often (every
one, the first N, or each with a probability drawn from a seeded generator); the server checks
the hub's faults, in the order they were added, at the start of every request and the first
that matches and fires decides what happens to it. `Fault.parse` reads the CLI's
`--fault SPEC` grammar (docs/localhub.md, "Fault mode").
"""

from __future__ import annotations

import math
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from bot.localhub.errors import LocalHubUsageError

KINDS = ("status", "hang", "drop")
SPEC_KEYS = ("status", "hang", "drop", "path", "method", "first", "probability", "seed", "reset",
             "after")


@dataclass
class Fault:
    """What to do to which requests.

    Args:
        kind: "status" (answer `status` with a JSON error), "hang" (stall `seconds`, then
            answer normally; the stall ends at once when the hub stops) or "drop" (close the
            connection without answering).
        path: a regex, `re.search`ed against the URL path without the query string; "" matches
            every path.
        method: "GET", "POST", "HEAD", ... (any case); None: every method.
        status: for "status", the HTTP status answered (100-599).
        seconds: for "hang", how long to stall; for "status" 429, the reset time put in the
            RateLimit and Retry-After headers (rounded up to whole seconds).
        first: only the first N matching requests get the fault.
        probability: each matching request gets it with this probability (0 < p <= 1), drawn
            from `random.Random(seed)`: the same requests in the same order get the same faults.
            `first` and `probability` together are refused; neither means every matching request.
        seed: the generator's seed for `probability`.
        after: for "status": the request is handled first (a commit lands) and the fault's
            answer replaces the real one, as when the Hub fails after doing the work.

    `matched` and `injected` count the requests that matched and those that got the fault
    (thread-safe; read them, do not set them).
    """

    kind: Literal["status", "hang", "drop"]
    path: str = ""
    method: str | None = None
    status: int = 503
    seconds: float = 1.0
    first: int | None = None
    probability: float | None = None
    seed: int = 0
    after: bool = False
    matched: int = field(default=0, init=False, compare=False)
    injected: int = field(default=0, init=False, compare=False)
    _regex: re.Pattern = field(init=False, repr=False, compare=False)
    _rng: random.Random = field(init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LocalHubUsageError(f"a fault's kind is one of {', '.join(KINDS)}, "
                                     f"not {self.kind!r}")
        if not isinstance(self.path, str):
            raise LocalHubUsageError(f"a fault's path must be a regex string, not {self.path!r}")
        try:
            self._regex = re.compile(self.path)
        except re.error as e:
            raise LocalHubUsageError(f"a fault's path {self.path!r} is not a valid regex: {e}"
                                     ) from None
        if self.method is not None:
            if not isinstance(self.method, str) or not re.fullmatch(r"[A-Za-z]+", self.method):
                raise LocalHubUsageError(f"a fault's method must be a word like GET, "
                                         f"not {self.method!r}")
            self.method = self.method.upper()
        if not _is_int(self.status) or not 100 <= self.status <= 599:
            raise LocalHubUsageError(f"a fault's status must be 100-599, not {self.status!r}")
        if (not isinstance(self.seconds, int | float) or isinstance(self.seconds, bool)
                or not math.isfinite(self.seconds) or self.seconds < 0):
            raise LocalHubUsageError(f"a fault's seconds must be a number >= 0, "
                                     f"not {self.seconds!r}")
        if self.first is not None and (not _is_int(self.first) or self.first < 1):
            raise LocalHubUsageError(f"a fault's first must be an integer >= 1, "
                                     f"not {self.first!r}")
        if self.probability is not None:
            p = self.probability
            if (not isinstance(p, int | float) or isinstance(p, bool) or not math.isfinite(p)
                    or not 0 < p <= 1):
                raise LocalHubUsageError(f"a fault's probability must be in (0, 1], not {p!r}")
        if self.first is not None and self.probability is not None:
            raise LocalHubUsageError("a fault takes first or probability, not both")
        if self.after is not False and (self.after is not True or self.kind != "status"):
            raise LocalHubUsageError("a fault's after is True or False, and only for status")
        if not _is_int(self.seed):
            raise LocalHubUsageError(f"a fault's seed must be an integer, not {self.seed!r}")
        self._rng = random.Random(self.seed)

    def fires(self, method: str, path: str) -> bool:
        """Whether this request (method, URL path) gets the fault; counts it. Thread-safe."""
        if self.method is not None and method.upper() != self.method:
            return False
        if not self._regex.search(path):
            return False
        with self._lock:
            self.matched += 1
            if self.first is not None:
                fire = self.matched <= self.first
            elif self.probability is not None:
                fire = self._rng.random() < self.probability
            else:
                fire = True
            if fire:
                self.injected += 1
            return fire

    @property
    def reset_seconds(self) -> int:
        """The whole seconds a 429 tells the client to wait (`seconds` rounded up)."""
        return math.ceil(self.seconds)

    def __str__(self) -> str:
        """The fault in the `--fault` grammar, e.g. `status=429,path=^/api/models,first=3`."""
        head = {"status": f"status={self.status}", "hang": f"hang={self.seconds:g}",
                "drop": "drop"}[self.kind]
        items = [head]
        if self.kind == "status" and self.status == 429:
            items.append(f"reset={self.seconds:g}")
        if self.after:
            items.append("after")
        if self.method is not None:
            items.append(f"method={self.method}")
        if self.first is not None:
            items.append(f"first={self.first}")
        if self.probability is not None:
            items.append(f"probability={self.probability:g}")
            items.append(f"seed={self.seed}")
        if self.path:
            items.append(f"path={self.path}")  # last: a regex may hold commas
        return ",".join(items)

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """A fault from the CLI grammar: comma-separated items, exactly one of `status=CODE`,
        `hang=SECONDS` or `drop`, plus optional `path=REGEX`, `method=GET`, `first=N`,
        `probability=P`, `seed=S` and `reset=SECONDS` (with status=429: the reset time).

        A piece without "=" that is not `drop` continues the previous `path` (a regex may hold
        commas: `path=^/a{1,3}`). Raises LocalHubUsageError on a bad spec.
        """
        def bad(why: str) -> LocalHubUsageError:
            return LocalHubUsageError(f"bad fault spec {spec!r}: {why}")

        items: dict[str, str] = {}
        last = None
        for piece in spec.split(","):
            key, eq, value = piece.partition("=")
            key = key.strip().lower()
            if not eq and key not in ("drop", "after"):
                if not key:
                    raise bad("an empty item")
                if last != "path":
                    raise bad(f"{piece.strip()!r} is not KEY=VALUE "
                              f"(keys: {', '.join(SPEC_KEYS)})")
                items["path"] += "," + piece  # a comma inside the regex
                continue
            if key not in SPEC_KEYS:
                raise bad(f"unknown key {key!r} (keys: {', '.join(SPEC_KEYS)})")
            if key in ("drop", "after") and eq:
                raise bad(f"{key} takes no value")
            if key in items:
                raise bad(f"{key} given twice")
            items[key] = value if key == "path" else value.strip()
            last = key
        kinds = [k for k in KINDS if k in items]
        if len(kinds) != 1:
            raise bad("give exactly one of status=CODE, hang=SECONDS or drop")

        def number(key: str, convert: type) -> int | float | None:
            return _number(items, key, convert, bad)

        status, hang, reset = number("status", int), number("hang", float), number("reset", float)
        for key, value in (("hang", hang), ("reset", reset)):
            if value is not None and value < 0:
                raise bad(f"{key} wants seconds >= 0, not {items[key]!r}")
        if reset is not None and status != 429:
            raise bad("reset=SECONDS goes with status=429 only")
        kwargs: dict = {"path": items.get("path", ""), "method": items.get("method"),
                        "first": number("first", int), "probability": number("probability", float),
                        "seed": number("seed", int) or 0, "after": "after" in items}
        if status is not None:
            kwargs["status"] = status
        if hang is not None or reset is not None:
            kwargs["seconds"] = hang if hang is not None else reset
        try:
            return cls(kinds[0], **kwargs)  # type: ignore[arg-type]
        except LocalHubUsageError as e:
            raise bad(str(e).removeprefix("a fault's ")) from None


def _number(items: dict[str, str], key: str, convert: type,
            bad: Callable[[str], LocalHubUsageError]) -> int | float | None:
    """The spec's `key` as an int or a finite float; None when absent."""
    if key not in items:
        return None
    try:
        value = convert(items[key])
    except ValueError:
        what = "an integer" if convert is int else "a number"
        raise bad(f"{key} wants {what}, not {items[key]!r}") from None
    if convert is float and not math.isfinite(value):
        raise bad(f"{key} wants a finite number, not {items[key]!r}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
