"""The local hub's routes: one table from (method, path) to the function that answers.

A request's path is matched segment by segment as the client meant it: each segment is
unquoted and quoted again, so a quoted '/' (a branch like `feature%2Fx`) stays inside its
segment, and the routes' patterns see literal slashes only between segments. The first route
whose method and pattern match answers; a path no route matches is a 404 naming the route.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable
from contextlib import AbstractContextManager
from urllib.parse import quote, unquote

from bot.localhub import commits, discussions, limits, listing, repos
from bot.localhub.errors import ApiError, not_found
from bot.localhub.protocol import Query, Reply, Request
from bot.localhub.store import Store

RouteHandler = Callable[["Api", Request], Reply]
ANY = "*"  # a route for every method

KIND = r"(?P<kinds>models|datasets)"
API_REPO = rf"/api/{KIND}/(?P<ns>[^/]*)/(?P<name>[^/]*)"
# Outside /api a leading models/ or datasets/ is always the repo type, never a namespace
# (the possessive ?+ keeps the pattern from trying it as one).
FILE_REPO = rf"/(?:{KIND}/)?+(?P<ns>[^/]*)/(?P<name>[^/]*)"
REST = r"(?:/(?P<rest>.*))?"  # the segments after a route's fixed part: req.rest
UNSUPPORTED = r"(?P<unsupported>spaces|kernels|buckets)"


def unknown(api: Api, req: Request) -> Reply:
    """A path the local hub does not serve."""
    raise req.unknown()


def without_namespace(api: Api, req: Request) -> Reply:
    """A repo id with no namespace: the Hub has none, so the repo is not found."""
    raise not_found(req.arg("ns"))


def unsupported_kind(api: Api, req: Request) -> Reply:
    raise ApiError(400, f"{req.arg('unsupported')} are not supported by the local hub")


def unsupported_api_kind(api: Api, req: Request) -> Reply:
    raise ApiError(400, f"{req.arg('unsupported')} are not supported by the local hub (models "
                        "and datasets only)")


ROUTE_PATTERNS: list[tuple[str, str, RouteHandler]] = [
    ("GET", "/api/whoami-v2", repos.whoami),
    ("POST", "/api/validate-yaml", repos.validate_yaml),
    ("POST", "/api/repos/create", repos.create_repo),
    ("DELETE", "/api/repos/delete", repos.delete_repo),
    (ANY, rf"/api/{UNSUPPORTED}(?:/.*)?", unsupported_api_kind),
    ("GET", rf"/api/{KIND}", listing.list_repos),
    (ANY, rf"{API_REPO}/xet-[^/]*(?:/.*)?", commits.refuse_xet),
    # repos
    ("GET", API_REPO, repos.info),
    ("GET", rf"{API_REPO}/revision{REST}", repos.info_at_revision),
    ("PUT", rf"{API_REPO}/settings{REST}", repos.settings),
    ("POST", rf"{API_REPO}/user-access-request/grant", repos.grant_access),
    ("POST", rf"{API_REPO}/like{REST}", repos.like),
    ("DELETE", rf"{API_REPO}/like{REST}", repos.like),
    ("GET", rf"{API_REPO}/auth-check", repos.read_check),
    ("GET", rf"{API_REPO}/auth-check/write", repos.write_check),
    # listings
    ("GET", rf"{API_REPO}/tree{REST}", listing.tree),
    ("POST", rf"{API_REPO}/paths-info{REST}", listing.paths_info),
    ("GET", rf"{API_REPO}/commits{REST}", listing.commits),
    ("GET", rf"{API_REPO}/refs{REST}", listing.refs),
    # commits, branches and tags
    ("POST", rf"{API_REPO}/preupload{REST}", commits.preupload),
    ("POST", rf"{API_REPO}/commit{REST}", commits.commit),
    ("POST", rf"{API_REPO}/(?P<ref>branch){REST}", commits.create_branch),
    ("POST", rf"{API_REPO}/(?P<ref>tag){REST}", commits.create_tag),
    ("DELETE", rf"{API_REPO}/(?P<ref>branch|tag){REST}", commits.delete_ref),
    # discussions and pull requests
    ("GET", rf"{API_REPO}/discussions", discussions.list_discussions),
    ("POST", rf"{API_REPO}/discussions", discussions.open_discussion),
    ("GET", rf"{API_REPO}/discussions/(?P<num>[0-9]+)", discussions.details),
    ("POST", rf"{API_REPO}/discussions/(?P<num>[0-9]+)/comment", discussions.comment),
    ("POST", rf"{API_REPO}/discussions/(?P<num>[0-9]+)/comment/(?P<comment>[^/]*)/edit",
     discussions.edit_comment),
    ("POST", rf"{API_REPO}/discussions/(?P<num>[0-9]+)/title", discussions.rename),
    ("POST", rf"{API_REPO}/discussions/(?P<num>[0-9]+)/status", discussions.change_status),
    ("POST", rf"{API_REPO}/discussions/(?P<num>[0-9]+)/merge", discussions.merge),
    (ANY, rf"/api/{KIND}/(?P<ns>[^/]*)", without_namespace),
    (ANY, r"/api(?:/.*)?", unknown),  # nothing else under /api
    # LFS uploads (the PUT of an object's bytes is streamed by server.py)
    ("POST", rf"{FILE_REPO}\.git/info/lfs/objects/(?P<op>[^/]*)", commits.lfs_objects),
    (ANY, rf"{FILE_REPO}\.git(?:/.*)?", unknown),
    # file downloads
    (ANY, rf"/{UNSUPPORTED}(?:/.*)?", unsupported_kind),
    (ANY, rf"/(?:{KIND}/)?+(?P<ns>[^/]*)/resolve/.*", without_namespace),
    ("GET", rf"{FILE_REPO}/resolve/(?P<rest>[^/]*/.*)", repos.download),
    ("HEAD", rf"{FILE_REPO}/resolve/(?P<rest>[^/]*/.*)", repos.download),
]
# the routing table: (method, compiled path pattern, handler), tried in order
ROUTES = [(method, re.compile(pattern), handler) for method, pattern, handler in ROUTE_PATTERNS]
# routes whose body is read for anonymous callers too; the others answer them unread (401)
ANONYMOUS_BODY = {listing.paths_info, repos.validate_yaml}
# the most bytes a route's body may hold (limits.API_BODY for the others)
BODY_LIMITS = {commits.commit: limits.COMMIT_BODY}
# work done before the store's lock is taken (parsing cards and payloads)
PREPARE: dict[RouteHandler, Callable[[Api, Request], None]] = {
    listing.list_repos: listing.warm_listing, repos.info: repos.warm_info,
    repos.info_at_revision: repos.warm_info, commits.commit: commits.prepare_commit}
# routes that touch no stored state: answered without the store's lock
UNLOCKED = {repos.validate_yaml}


class Api:
    """The hub's state for its routes (store, page size, the LFS URL secret). The server asks
    `route` which handler answers a request, reads its body when `reads_body` (at most
    `body_limit` bytes), runs `prepare`, then the handler under `lock_for`."""

    def __init__(self, store: Store, page_size: int):
        self.store = store
        self.page_size = page_size
        self.secret = secrets.token_bytes(32)

    def route(self, method: str, path: str, query: Query, user: str | None, base: str,
              content_type: str, byte_range: str | None = None
              ) -> tuple[RouteHandler, Request]:
        """The route that answers a request, and the request as it sees it (its body not read
        yet: set `body`); 404 when no route matches."""
        segs = [unquote(s) for s in path.split("/")[1:]]
        if len(segs) > 1 and segs[-1] == "":
            segs = segs[:-1]
        req = Request(method, segs, query, None, user, base, content_type, byte_range)
        canonical = "/" + "/".join(quote(s, safe="") for s in segs)
        for route_method, pattern, handler in ROUTES:
            if route_method in (method, ANY):
                req.match = pattern.fullmatch(canonical)
                if req.match is not None:
                    return handler, req
        raise req.unknown()

    @staticmethod
    def reads_body(handler: RouteHandler, user: str | None) -> bool:
        """Whether the request's body is read: always for a user, for anonymous callers of a
        few routes only."""
        return user is not None or handler in ANONYMOUS_BODY

    @staticmethod
    def body_limit(handler: RouteHandler) -> int:
        return BODY_LIMITS.get(handler, limits.API_BODY)

    def prepare(self, handler: RouteHandler, req: Request) -> None:
        """What a route does before the store's lock (PREPARE): parse cards, payloads."""
        step = PREPARE.get(handler)
        if step is not None:
            step(self, req)

    def lock_for(self, handler: RouteHandler) -> AbstractContextManager:
        """The store's lock, or nothing for routes that touch no stored state."""
        return contextlib.nullcontext() if handler in UNLOCKED else self.store.lock
