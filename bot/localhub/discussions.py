"""Routes for discussions and pull requests: list, open, details, comment, edit a comment,
rename, change status, merge. Anyone logged in who sees a repo may open one; its author or
the repo's owners moderate it; only owners merge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.localhub.errors import ApiError
from bot.localhub.protocol import Reply, Request, reply_json, require_fields
from bot.localhub.records import api_time, find_discussion, new_event, now

if TYPE_CHECKING:
    from bot.localhub.api import Api

DISCUSSION_PAGE = 50


def _discussion_json(api: Api, repo: dict, d: dict, details: bool) -> dict:
    out: dict[str, Any] = {
        "num": d["num"], "title": d["title"], "status": d["status"],
        "author": {"name": d["author"], "type": "user"}, "createdAt": d["createdAt"],
        "repo": {"name": repo["id"], "type": repo["type"]},
        "isPullRequest": d["isPullRequest"], "pinned": False, "topReactions": [],
        "numComments": sum(e["type"] == "comment" for e in d["events"])}
    if details:
        out["events"] = d["events"]
        if d["isPullRequest"]:
            out["changes"] = {"base": f"refs/heads/{d['base']}"}
            if d.get("mergeCommitId"):
                out["changes"]["mergeCommitId"] = d["mergeCommitId"]
            out["filesWithConflicts"] = []
            out["diff"] = _diff(api, repo, d)
    return out


def _diff(api: Api, repo: dict, d: dict) -> str:
    """A list of the files a PR changes, as diff headers (no content lines)."""
    before = api.store.commit(repo, d["baseCommit"])["tree"]
    after = api.store.commit(repo, d["head"])["tree"]
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    return "".join(f"diff --git a/{p} b/{p}\n" for p in changed)


def list_discussions(api: Api, req: Request) -> Reply:
    """get_repo_discussions: newest first, filtered, 50 a page."""
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    q = req.query.allow("p", "type", "status", "author", "search")
    kind = q.one("type", "all")
    status = q.one("status", "all")
    if kind not in ("all", "discussion", "pull_request"):
        raise ApiError(400, "type must be all, discussion or pull_request")
    if status not in ("all", "open", "closed"):
        raise ApiError(400, "status must be all, open or closed")
    author, search = q.one("author"), (q.one("search") or "").lower()
    chosen = []
    for d in reversed(repo["discussions"]):
        if kind != "all" and d["isPullRequest"] != (kind == "pull_request"):
            continue
        if status == "open" and d["status"] not in ("open", "draft"):
            continue
        if status == "closed" and d["status"] not in ("closed", "merged"):
            continue
        if author is not None and d["author"] != author:
            continue
        if search and search not in d["title"].lower():
            continue
        chosen.append(d)
    size = min(DISCUSSION_PAGE, api.page_size)
    start = q.int("p", 0) * size
    return reply_json({
        "discussions": [_discussion_json(api, repo, d, False)
                        for d in chosen[start:start + size]],
        "count": len(chosen), "start": start,
        "numClosedDiscussions": sum(d["status"] in ("closed", "merged") for d in chosen)})


def open_discussion(api: Api, req: Request) -> Reply:
    """create_discussion / create_pull_request (a draft)."""
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    req.query.allow()
    user = req.need_user()
    body = require_fields(req.json(), {"title": str}, {"description": str, "pullRequest": bool})
    d = api.store.create_discussion(repo, body["title"], body.get("description") or "",
                                    user, bool(body.get("pullRequest")))
    return reply_json({"num": d["num"], "pullRequest": d["isPullRequest"],
                       "url": f"{req.repo_url(repo)}/discussions/{d['num']}"})


def details(api: Api, req: Request) -> Reply:
    """get_discussion_details: events, and for a PR its target, merge commit and diff."""
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    d = find_discussion(repo, int(req.arg("num")))
    req.query.allow("diff")
    return reply_json(_discussion_json(api, repo, d, details=True))


def _acting_on(api: Api, req: Request, moderate: bool = False) -> tuple[dict, dict, str]:
    """(repo, discussion, user) for a POST on a discussion; `moderate`: author or owners only."""
    repo = api.store.get_repo(req.kind, req.repo_id, req.user)
    d = find_discussion(repo, int(req.arg("num")))
    req.query.allow()
    user = req.need_user()
    if moderate and not api.store.may_moderate(user, repo, d):
        raise ApiError(403, "only the discussion's author or the repo's owners can do that")
    return repo, d, user


def comment(api: Api, req: Request) -> Reply:
    repo, d, user = _acting_on(api, req)
    body = require_fields(req.json(), {"comment": str})
    if not body["comment"].strip():
        raise ApiError(400, "a comment cannot be empty")
    event = new_event("comment", user, raw=body["comment"])
    d["events"].append(event)
    api.store.save_repo(repo)
    return reply_json({"newMessage": event})


def edit_comment(api: Api, req: Request) -> Reply:
    """A comment's new text, by its author; the old one goes to its history."""
    repo, d, user = _acting_on(api, req)
    body = require_fields(req.json(), {"content": str})
    comment_id = req.arg("comment")
    event = next((e for e in d["events"] if e["id"] == comment_id
                  and e["type"] == "comment"), None)
    if event is None:
        raise ApiError(404, f"comment {comment_id} not found")
    if event["author"]["name"] != user:
        raise ApiError(403, "only a comment's author can edit it")
    latest = event["data"]["latest"]
    event["data"]["history"].insert(0, dict(latest))
    latest.update(raw=body["content"], html=body["content"], updatedAt=api_time(now()))
    event["data"]["edited"] = True
    api.store.save_repo(repo)
    return reply_json({"updatedComment": event})


def rename(api: Api, req: Request) -> Reply:
    repo, d, user = _acting_on(api, req, moderate=True)
    body = require_fields(req.json(), {"title": str})
    title = body["title"].strip()
    if not 3 <= len(title) <= 200:
        raise ApiError(400, "A title must have 3 to 200 characters")
    event = new_event("title-change", user, old=d["title"], new=title)
    d["title"] = title
    d["events"].append(event)
    api.store.save_repo(repo)
    return reply_json({"newTitle": event})


def change_status(api: Api, req: Request) -> Reply:
    """Close or reopen (a merged PR stays merged), with an optional comment."""
    repo, d, user = _acting_on(api, req, moderate=True)
    body = require_fields(req.json(), {"status": str}, {"comment": str})
    if body["status"] not in ("open", "closed"):
        raise ApiError(400, "status must be open or closed")
    if d["status"] == "merged":
        raise ApiError(400, f"#{d['num']} is merged; its status cannot change")
    if body.get("comment"):
        d["events"].append(new_event("comment", user, raw=body["comment"]))
    event = new_event("status-change", user, status=body["status"])
    d["status"] = body["status"]
    d["events"].append(event)
    api.store.save_repo(repo)
    return reply_json({"newStatus": event})


def merge(api: Api, req: Request) -> Reply:
    """merge_pull_request, by the repo's owners."""
    repo, d, user = _acting_on(api, req)
    if not api.store.can_write(user, repo):
        raise ApiError(403, f"only the owners of {repo['id']} can merge pull requests")
    body = require_fields(req.json(allow_empty=True), {}, {"comment": str})
    api.store.merge(repo, d, user, body.get("comment"))
    return reply_json({})
