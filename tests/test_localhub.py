"""The local hub driven by the real huggingface_hub client over HTTP (no mocks).

Most tests share the session's `localhub` fixture (conftest.py) and use repo names starting
with `lh-` so as not to meet other modules' repos; the restart, pagination-user and CLI tests
add what they need.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    get_session,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import hf_raise_for_status
from safetensors.numpy import save_file

from bot.localhub import LocalHub
from bot.localhub import LocalHubError as HubError
from bot.localhub import LocalHubUsageError as UsageError

ALICE, BOB = "hf_alice_token", "hf_bob_token"
CONFIG = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


@pytest.fixture(scope="module")
def alice(localhub):
    return HfApi(endpoint=localhub.url, token=ALICE)


@pytest.fixture(scope="module")
def bob(localhub):
    return HfApi(endpoint=localhub.url, token=BOB)


@pytest.fixture(scope="module")
def anon(localhub):
    return HfApi(endpoint=localhub.url, token=False)


def card(**meta) -> str:
    lines = [f"{k}: {json.dumps(v)}" for k, v in meta.items()]
    return "---\n" + "\n".join(lines) + "\n---\n\n# A model\n"


def weights(path, rows: int = 4) -> bytes:
    save_file({"w": np.arange(rows * 8, dtype=np.float32).reshape(rows, 8)}, str(path))
    return path.read_bytes()


def adds(files: dict[str, bytes | str]) -> list[CommitOperationAdd]:
    return [CommitOperationAdd(p, c.encode() if isinstance(c, str) else c)
            for p, c in files.items()]


def raw(hub, method: str, path: str, token: str | None = ALICE, **kwargs):
    headers = {**({"authorization": f"Bearer {token}"} if token else {}),
               **kwargs.pop("headers", {})}
    return get_session().request(method, f"{hub.url}{path}", headers=headers, **kwargs)


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def status_of(excinfo) -> int:
    return excinfo.value.response.status_code


# ---- repos, users, auth


def test_fixture_reaches_only_the_local_hub(localhub):
    from huggingface_hub.errors import OfflineModeIsEnabled

    with pytest.raises(OfflineModeIsEnabled, match="only reach the local hub"):
        HfApi(endpoint="https://huggingface.co", token=False).model_info("gpt2")
    assert HfApi(endpoint=localhub.url, token=BOB).whoami()["name"] == "bob"


def test_whoami_and_create_delete_repos(localhub, alice, bob):
    me = alice.whoami()
    assert me["name"] == "alice" and [o["name"] for o in me["orgs"]] == ["safeguard"]
    url = alice.create_repo("alice/lh-public")
    assert url.repo_id == "alice/lh-public" and url.startswith(localhub.url)
    # a new repo holds the Hub's initial commit: a .gitattributes file
    assert alice.list_repo_files("alice/lh-public") == [".gitattributes"]
    with pytest.raises(HfHubHTTPError) as e:
        alice.create_repo("alice/lh-public")
    assert status_of(e) == 409
    assert alice.create_repo("alice/lh-public", exist_ok=True).repo_id == "alice/lh-public"
    alice.create_repo("safeguard/lh-private", private=True)  # an org alice belongs to
    assert alice.model_info("safeguard/lh-private").private is True
    assert alice.model_info("alice/lh-public").private is False
    with pytest.raises(HfHubHTTPError) as e:
        bob.create_repo("safeguard/lh-not-bobs")
    assert status_of(e) == 403 and "namespace" in str(e.value)
    alice.delete_repo("alice/lh-public")
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("alice/lh-public")
    alice.delete_repo("alice/lh-public", missing_ok=True)


def test_tokens_are_checked(localhub, alice, anon):
    alice.create_repo("alice/lh-auth", exist_ok=True)
    wrong = HfApi(endpoint=localhub.url, token="hf_not_a_real_token")
    for call in (lambda: wrong.create_repo("alice/lh-auth-2"),
                 lambda: wrong.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt",
                                           repo_id="alice/lh-auth"),
                 lambda: wrong.model_info("alice/lh-auth")):  # like the Hub: a bad token fails
        with pytest.raises(HfHubHTTPError) as e:
            call()
        assert status_of(e) == 401 and "Invalid credentials" in str(e.value)
    for call in (lambda: anon.create_repo("alice/lh-auth-3"),
                 lambda: anon.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt",
                                          repo_id="alice/lh-auth"),
                 lambda: anon.delete_repo("alice/lh-auth")):
        with pytest.raises(HfHubHTTPError) as e:
            call()
        assert status_of(e) == 401
    # reads of public repos need no token
    assert anon.model_info("alice/lh-auth").id == "alice/lh-auth"
    assert "alice/lh-auth" in {m.id for m in anon.list_models(author="alice")}


def test_private_repos_are_invisible_to_others(localhub, alice, bob, anon, tmp_path):
    repo = "safeguard/lh-secret"
    alice.create_repo(repo, private=True)
    alice.upload_file(path_or_fileobj=b"hidden", path_in_repo="a.txt", repo_id=repo)
    for api in (bob, anon):
        with pytest.raises(RepositoryNotFoundError) as e:
            api.model_info(repo)
        assert not isinstance(e.value, GatedRepoError)
        assert repo not in {m.id for m in api.list_models(author="safeguard")}
        with pytest.raises(RepositoryNotFoundError):
            api.list_repo_files(repo)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo, "a.txt", endpoint=localhub.url, token=BOB, cache_dir=tmp_path)
    with pytest.raises(RepositoryNotFoundError):  # not even a pull request
        bob.create_commit(repo, adds({"b.txt": "x"}), commit_message="hi", create_pr=True)
    assert repo in {m.id for m in alice.list_models(author="safeguard")}


def test_gated_repo_metadata_visible_files_refused(localhub, alice, bob, anon, tmp_path):
    repo = "alice/lh-gated"
    alice.create_repo(repo)
    alice.upload_file(path_or_fileobj=b"weights", path_in_repo="w.txt", repo_id=repo)
    alice.update_repo_settings(repo, gated="auto")
    assert bob.model_info(repo).gated == "auto"
    assert anon.list_repo_files(repo) == [".gitattributes", "w.txt"]
    for token in (BOB, False):
        with pytest.raises(GatedRepoError):
            hf_hub_download(repo, "w.txt", endpoint=localhub.url, token=token,
                            cache_dir=tmp_path / "refused")
    path = hf_hub_download(repo, "w.txt", endpoint=localhub.url, token=ALICE,
                           cache_dir=tmp_path / "owner")
    assert read(path) == b"weights"
    alice.grant_access(repo, "bob")
    path = hf_hub_download(repo, "w.txt", endpoint=localhub.url, token=BOB,
                           cache_dir=tmp_path / "granted")
    assert read(path) == b"weights"


# ---- uploads, tags, downloads


def test_upload_folder_lfs_and_derived_tags(localhub, alice, tmp_path):
    repo = "safeguard/lh-finetune"
    alice.create_repo(repo)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text(card(base_model="safeguard/lh-base", license="apache-2.0",
                                           tags=["safety"], datasets=["org/chat"]))
    (folder / "config.json").write_text(CONFIG)
    st = weights(folder / "model.safetensors")
    # the preupload answer: safetensors (by .gitattributes), binary and >= 10 MB files go to LFS
    sample = base64.b64encode(st[:512]).decode()
    text = base64.b64encode(b"hello").decode()
    r = raw(localhub, "POST", f"/api/models/{repo}/preupload/main", json={"files": [
        {"path": "model.safetensors", "sample": sample, "size": len(st)},
        {"path": "config.json", "sample": text, "size": 5},
        {"path": "notes.txt", "sample": text, "size": 11 * 2**20},
        {"path": "blob.dat", "sample": base64.b64encode(b"a\0b").decode(), "size": 3}]})
    hf_raise_for_status(r)
    modes = {f["path"]: f["uploadMode"] for f in r.json()["files"]}
    assert modes == {"model.safetensors": "lfs", "config.json": "regular", "notes.txt": "lfs",
                     "blob.dat": "lfs"}

    commit = alice.upload_folder(repo_id=repo, folder_path=folder)
    info = alice.model_info(repo, files_metadata=True)
    assert info.sha == commit.oid and len(info.sha) == 40
    assert {"transformers", "safetensors", "llama", "text-generation", "safety",
            "dataset:org/chat", "base_model:safeguard/lh-base",
            "base_model:finetune:safeguard/lh-base", "license:apache-2.0"} <= set(info.tags)
    assert info.card_data.base_model == "safeguard/lh-base"
    assert info.library_name == "transformers" and info.pipeline_tag == "text-generation"
    assert info.safetensors.total == 32 and info.config["model_type"] == "llama"
    assert info.author == "safeguard" and info.created_at and info.last_modified
    siblings = {s.rfilename: s for s in info.siblings}
    assert siblings["model.safetensors"].lfs.size == len(st)
    assert siblings["model.safetensors"].lfs.sha256 == __import__("hashlib").sha256(st).hexdigest()
    assert siblings["config.json"].lfs is None and siblings["config.json"].size == len(CONFIG)
    # the preupload returns the stored oids: an unchanged folder makes no new commit
    again = alice.upload_folder(repo_id=repo, folder_path=folder)
    assert again.oid == commit.oid
    assert len(alice.list_repo_commits(repo)) == 2
    # a README with broken metadata is refused (the client asks /api/validate-yaml first)
    with pytest.raises(ValueError, match="Invalid metadata"):
        alice.upload_file(path_or_fileobj=b"---\nbase_model: [unclosed\n---\n",
                          path_in_repo="README.md", repo_id=repo)


def test_base_model_relations(localhub, alice, tmp_path):
    st = weights(tmp_path / "w.safetensors")
    base = "safeguard/lh-base"
    cases = {
        "alice/lh-adapter": ({"README.md": card(base_model=base), "adapter_config.json": "{}",
                              "adapter_model.safetensors": st}, "adapter"),
        "alice/lh-merge": ({"README.md": card(base_model=[base, "other/base"]),
                            "model.safetensors": st}, "merge"),
        "alice/lh-gguf": ({"README.md": card(base_model=base), "model-q4.gguf": b"GGUF\0\0"},
                          "quantized"),
        "alice/lh-relation": ({"README.md": card(base_model=base, base_model_relation="merge"),
                               "model.safetensors": st}, "merge"),
    }
    for repo, (files, relation) in cases.items():
        alice.create_repo(repo)
        alice.create_commit(repo, adds(files), commit_message="weights")
        tags = set(alice.model_info(repo).tags)
        assert f"base_model:{relation}:{base}" in tags, (repo, tags)
        assert {f"base_model:{r}:{base}" for r in ("adapter", "merge", "quantized",
                                                   "finetune")} & tags == \
            {f"base_model:{relation}:{base}"}
    assert "base_model:merge:other/base" in alice.model_info("alice/lh-merge").tags
    assert "gguf" in alice.model_info("alice/lh-gguf").tags
    assert alice.model_info("alice/lh-adapter").library_name == "peft"


def test_list_models_filters_sort_limit(localhub, alice, bob):
    for name, base in (("lh-sort-a", "alice/lh-sortbase"), ("lh-sort-b", "alice/lh-sortbase"),
                       ("lh-sort-c", "alice/lh-other")):
        bob.create_repo(f"bob/{name}")
        bob.create_commit(f"bob/{name}", adds({"README.md": card(base_model=base, tags=[name]),
                                              "adapter_config.json": "{}"} if name.endswith("c")
                                             else {"README.md": card(base_model=base)}),
                          commit_message="card")
    finetunes = {m.id for m in alice.list_models(filter="base_model:finetune:alice/lh-sortbase")}
    assert finetunes == {"bob/lh-sort-a", "bob/lh-sort-b"}
    # several filters are ANDed
    assert [m.id for m in alice.list_models(filter=["base_model:alice/lh-other", "peft"])] == \
        ["bob/lh-sort-c"]
    assert list(alice.list_models(filter=["base_model:alice/lh-other", "safetensors"])) == []
    assert {m.id for m in alice.list_models(search="LH-SORT", author="bob")} == \
        {"bob/lh-sort-a", "bob/lh-sort-b", "bob/lh-sort-c"}
    # newest first by creation; by downloads (most first); limit stops the listing
    assert [m.id for m in alice.list_models(search="lh-sort", sort="created_at")] == \
        ["bob/lh-sort-c", "bob/lh-sort-b", "bob/lh-sort-a"]
    localhub.set_downloads("bob/lh-sort-a", 30)
    localhub.set_downloads("bob/lh-sort-b", 20)
    by_downloads = list(alice.list_models(search="lh-sort", sort="downloads"))
    assert [m.id for m in by_downloads] == ["bob/lh-sort-a", "bob/lh-sort-b", "bob/lh-sort-c"]
    assert by_downloads[0].downloads == 30
    assert len(list(alice.list_models(search="lh-sort", limit=2))) == 2
    bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="bob/lh-sort-a")
    assert next(iter(alice.list_models(search="lh-sort", sort="last_modified"))).id == \
        "bob/lh-sort-a"
    # plain listings are short, like the Hub's; full and cardData add fields
    plain = next(iter(alice.list_models(search="lh-sort-b")))
    assert plain.sha is None and plain.siblings is None and plain.card_data is None
    full = next(iter(alice.list_models(search="lh-sort-b", full=True, cardData=True)))
    assert len(full.sha) == 40 and [s.rfilename for s in full.siblings] == [
        ".gitattributes", "README.md"] and full.card_data.base_model == "alice/lh-sortbase"
    expanded = next(iter(alice.list_models(search="lh-sort-b", expand=["sha", "tags"])))
    assert expanded.sha == full.sha and expanded.downloads is None


def test_pagination_follows_link_headers(localhub, alice):
    localhub.add_user("lhpager", "hf_lhpager_token")
    pager = HfApi(endpoint=localhub.url, token="hf_lhpager_token")
    for i in range(5):
        pager.create_repo(f"lhpager/repo-{i}")
    pager.create_commit("lhpager/repo-0", adds({f"f{i}.txt": str(i) for i in range(5)}),
                        commit_message="files")
    for i in range(4):
        pager.create_discussion("lhpager/repo-0", f"question {i}")
    localhub.page_size = 2
    try:
        first = raw(localhub, "GET", "/api/models", params={"author": "lhpager"})
        assert len(first.json()) == 2 and 'rel="next"' in first.headers["link"]
        ids = [m.id for m in alice.list_models(author="lhpager")]
        assert ids == [f"lhpager/repo-{i}" for i in (4, 3, 2, 1, 0)]
        assert len(alice.list_repo_files("lhpager/repo-0")) == 6
        assert len(alice.list_repo_commits("lhpager/repo-0")) == 2
        assert len(list(alice.get_repo_discussions("lhpager/repo-0"))) == 4
    finally:
        localhub.page_size = 1000


def test_downloads_regular_and_lfs(localhub, alice, anon, tmp_path):
    repo = "alice/lh-download"
    alice.create_repo(repo)
    st = weights(tmp_path / "w.safetensors", rows=64)
    first = alice.create_commit(repo, adds({"config.json": CONFIG, "model.safetensors": st,
                                            "sub/dir/notes.md": "v1"}), commit_message="v1")
    alice.create_commit(repo, adds({"sub/dir/notes.md": "v2"}), commit_message="v2")
    cache = tmp_path / "cache"
    for name, content in (("config.json", CONFIG.encode()), ("model.safetensors", st),
                          ("sub/dir/notes.md", b"v2")):
        path = hf_hub_download(repo, name, endpoint=localhub.url, token=False, cache_dir=cache)
        assert read(path) == content
    old = hf_hub_download(repo, "sub/dir/notes.md", revision=first.oid, endpoint=localhub.url,
                          cache_dir=cache)
    assert read(old) == b"v1"
    lfs = get_hf_file_metadata(hf_hub_url(repo, "model.safetensors", endpoint=localhub.url))
    assert lfs.etag == __import__("hashlib").sha256(st).hexdigest() and lfs.size == len(st)
    regular = get_hf_file_metadata(hf_hub_url(repo, "config.json", endpoint=localhub.url))
    assert regular.size == len(CONFIG) and len(regular.etag) == 40
    assert regular.commit_hash == alice.model_info(repo).sha
    snapshot = snapshot_download(repo, endpoint=localhub.url, cache_dir=tmp_path / "snap")
    got = {os.path.relpath(os.path.join(d, f), snapshot)
           for d, _, files in os.walk(snapshot) for f in files}
    assert got == {".gitattributes", "config.json", "model.safetensors", "sub/dir/notes.md"}
    assert read(os.path.join(snapshot, "model.safetensors")) == st
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.txt", endpoint=localhub.url, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="no-such-branch", endpoint=localhub.url,
                        cache_dir=cache)
    tree = {f.path: f for f in anon.list_repo_tree(repo, recursive=True)}
    assert tree["model.safetensors"].lfs.size == len(st) and tree["sub"].tree_id
    assert [f.path for f in anon.list_repo_tree(repo, path_in_repo="sub/dir")] == \
        ["sub/dir/notes.md"]
    # a byte range, as resumed downloads ask for
    r = raw(localhub, "GET", f"/{repo}/resolve/main/model.safetensors",
            headers={"Range": "bytes=10-19"}, token=None)
    assert r.status_code == 206 and r.content == st[10:20]


# ---- commits, pull requests, refs


def test_dataset_appends_with_parent_commit(localhub, alice, tmp_path):
    repo = "safeguard/lh-feed"
    alice.create_repo(repo, repo_type="dataset")
    head = alice.dataset_info(repo).sha
    one = alice.create_commit(repo, adds({"results/1.json": '{"n": 1}'}), commit_message="1",
                              repo_type="dataset", parent_commit=head)
    two = alice.create_commit(repo, adds({"results/2.json": '{"n": 2}',
                                          "README.md": card(license="mit", tags=["feed"])}),
                              commit_message="2", repo_type="dataset", parent_commit=one.oid)
    with pytest.raises(HfHubHTTPError) as e:
        alice.create_commit(repo, adds({"results/3.json": "{}"}), commit_message="stale",
                            repo_type="dataset", parent_commit=one.oid)
    assert status_of(e) == 412 and "A commit has happened since" in str(e.value)
    info = alice.dataset_info(repo)
    assert info.sha == two.oid and {"feed", "license:mit"} <= set(info.tags)
    assert sorted(alice.list_repo_files(repo, repo_type="dataset")) == [
        ".gitattributes", "README.md", "results/1.json", "results/2.json"]
    assert [c.commit_id for c in alice.list_repo_commits(repo, repo_type="dataset")][:2] == \
        [two.oid, one.oid]
    path = hf_hub_download(repo, "results/2.json", repo_type="dataset", endpoint=localhub.url,
                           cache_dir=tmp_path)
    assert json.loads(read(path)) == {"n": 2}
    assert repo in {d.id for d in alice.list_datasets(author="safeguard")}
    alice.create_commit(repo, [CommitOperationDelete("results/", is_folder=True)],
                        commit_message="clear", repo_type="dataset")
    assert "results/1.json" not in alice.list_repo_files(repo, repo_type="dataset")


def test_concurrent_appenders_lose_nothing(localhub, alice):
    """Writers racing on one feed file: 412 on a stale parent, re-read, retry (bot/hub.py)."""
    repo = "safeguard/lh-race"
    alice.create_repo(repo, repo_type="dataset")

    def append(line: str) -> int:
        api = HfApi(endpoint=localhub.url, token=ALICE)
        for attempt in range(50):
            head = api.dataset_info(repo).sha
            files = api.list_repo_files(repo, repo_type="dataset", revision=head)
            text = b""
            if "feed.jsonl" in files:
                text = raw(localhub, "GET", f"/datasets/{repo}/resolve/{head}/feed.jsonl").content
            try:
                api.create_commit(repo, adds({"feed.jsonl": text + line.encode() + b"\n"}),
                                  commit_message=line, repo_type="dataset", parent_commit=head)
                return attempt
            except HfHubHTTPError as e:
                assert e.response.status_code == 412
        raise AssertionError("never got through")

    with ThreadPoolExecutor(4) as pool:
        retries = list(pool.map(append, [f"line {i}" for i in range(8)]))
    feed = raw(localhub, "GET", f"/datasets/{repo}/resolve/main/feed.jsonl").content.decode()
    assert sorted(feed.splitlines()) == sorted(f"line {i}" for i in range(8))
    assert len(alice.list_repo_commits(repo, repo_type="dataset")) == 9
    assert sum(retries) > 0  # they did collide


def test_copies_within_a_repo(localhub, alice, tmp_path):
    repo = "alice/lh-copy"
    alice.create_repo(repo)
    st = weights(tmp_path / "w.safetensors")
    alice.create_commit(repo, adds({"a/model.safetensors": st, "a/config.json": CONFIG}),
                        commit_message="a")
    alice.create_commit(repo, [CommitOperationCopy("a/model.safetensors", "b/model.safetensors"),
                               CommitOperationCopy("a/config.json", "b/config.json")],
                        commit_message="copy")
    files = {s.rfilename: s for s in alice.model_info(repo, files_metadata=True).siblings}
    assert files["b/model.safetensors"].lfs.sha256 == files["a/model.safetensors"].lfs.sha256
    path = hf_hub_download(repo, "b/config.json", endpoint=localhub.url, cache_dir=tmp_path)
    assert read(path) == CONFIG.encode()


def test_pull_request_comment_list_merge(localhub, alice, bob, tmp_path):
    repo = "alice/lh-pr"
    alice.create_repo(repo)
    alice.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id=repo)
    with pytest.raises(HfHubHTTPError) as e:  # bob cannot write to main...
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="b.txt", repo_id=repo)
    assert status_of(e) == 403
    st = weights(tmp_path / "w.safetensors")
    pr = bob.create_commit(repo, adds({"b.txt": "from bob", "w.safetensors": st}),  # ...but a PR
                           commit_message="Add b", commit_description="Please merge",
                           create_pr=True)
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1" and pr.pr_url.endswith("/1")
    assert "b.txt" not in alice.list_repo_files(repo)
    assert "b.txt" in alice.list_repo_files(repo, revision="refs/pr/1")
    bob.create_commit(repo, adds({"c.txt": "more"}), commit_message="Add c",
                      revision="refs/pr/1")
    comment = alice.comment_discussion(repo, 1, "Thanks, looking")
    assert comment.content == "Thanks, looking" and comment.author == "alice"
    listed = list(alice.get_repo_discussions(repo, author="bob", discussion_type="pull_request",
                                             discussion_status="open"))
    assert [(d.num, d.title, d.is_pull_request) for d in listed] == [(1, "Add b", True)]
    details = alice.get_discussion_details(repo, 1)
    assert details.status == "open" and details.target_branch == "refs/heads/main"
    assert [e.type for e in details.events] == ["comment", "commit", "commit", "comment"]
    assert details.events[0].content == "Please merge"
    assert [e.summary for e in details.events if e.type == "commit"] == ["Add b", "Add c"]
    with pytest.raises(HfHubHTTPError) as e:
        bob.merge_pull_request(repo, 1)
    assert status_of(e) == 403
    alice.merge_pull_request(repo, 1, comment="merging")
    assert sorted(alice.list_repo_files(repo)) == [".gitattributes", "a.txt", "b.txt", "c.txt",
                                                   "w.safetensors"]
    merged = alice.get_discussion_details(repo, 1)
    assert merged.status == "merged" and merged.merge_commit_oid == alice.model_info(repo).sha
    assert merged.events[-1].new_status == "merged"
    refs = alice.list_repo_refs(repo, include_pull_requests=True)
    assert [(r.name, r.ref) for r in refs.pull_requests] == [("refs/pr/1", "refs/pr/1")]
    # main moved since the PR began: merging makes a merge commit with both sides
    pr2 = bob.create_commit(repo, adds({"d.txt": "bob's"}), commit_message="Add d",
                            create_pr=True)
    alice.upload_file(path_or_fileobj=b"alice's", path_in_repo="e.txt", repo_id=repo)
    alice.merge_pull_request(repo, pr2.pr_num)
    assert {"d.txt", "e.txt"} <= set(alice.list_repo_files(repo))
    assert alice.list_repo_commits(repo)[0].title.startswith("Merge pull request #2")
    # both sides changed a.txt: a conflict, the PR stays open
    pr3 = bob.create_commit(repo, adds({"a.txt": "bob's a"}), commit_message="Change a",
                            create_pr=True)
    alice.upload_file(path_or_fileobj=b"alice's a", path_in_repo="a.txt", repo_id=repo)
    with pytest.raises(HfHubHTTPError) as e:
        alice.merge_pull_request(repo, pr3.pr_num)
    assert status_of(e) == 409 and "a.txt" in str(e.value)
    assert alice.get_discussion_details(repo, pr3.pr_num).status == "open"
    alice.change_discussion_status(repo, pr3.pr_num, "closed", comment="conflicts")
    closed = list(alice.get_repo_discussions(repo, discussion_status="closed"))
    assert [d.num for d in closed] == [3, 2, 1]  # merged ones count as closed


def test_discussions_rename_edit_and_status(localhub, alice, bob):
    repo = "alice/lh-talk"
    alice.create_repo(repo)
    d = bob.create_discussion(repo, "A question", description="Is it safe?")
    assert d.num == 1 and not d.is_pull_request and d.status == "open"
    draft = bob.create_pull_request(repo, "Draft idea")
    assert draft.status == "draft" and draft.is_pull_request
    renamed = bob.rename_discussion(repo, 1, "A better question")
    assert (renamed.old_title, renamed.new_title) == ("A question", "A better question")
    edited = bob.edit_discussion_comment(repo, 1, d.events[0].id, "Is it really safe?")
    assert edited.content == "Is it really safe?" and edited.edited
    with pytest.raises(HfHubHTTPError) as e:
        alice.edit_discussion_comment(repo, 1, d.events[0].id, "not mine")
    assert status_of(e) == 403
    assert bob.change_discussion_status(repo, 1, "closed").new_status == "closed"
    assert [x.num for x in alice.get_repo_discussions(repo, discussion_type="discussion",
                                                      discussion_status="closed")] == [1]
    assert [x.num for x in alice.get_repo_discussions(repo, discussion_status="open")] == [2]
    with pytest.raises(HfHubHTTPError) as e:  # nothing to merge in a draft without commits
        alice.merge_pull_request(repo, 2)
    assert status_of(e) == 400


def test_tags_branches_and_refs(localhub, alice, tmp_path):
    repo = "alice/lh-refs"
    alice.create_repo(repo)
    v1 = alice.upload_file(path_or_fileobj=b"one", path_in_repo="f.txt", repo_id=repo).oid
    alice.create_tag(repo, tag="v1", tag_message="first")
    alice.upload_file(path_or_fileobj=b"two", path_in_repo="f.txt", repo_id=repo)
    alice.create_branch(repo, branch="dev", revision="v1")
    alice.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=repo,
                      revision="dev")
    refs = alice.list_repo_refs(repo)
    assert [b.name for b in refs.branches] == ["main", "dev"]
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", v1)]
    assert refs.pull_requests is None
    assert alice.model_info(repo, revision="v1").sha == v1
    assert alice.model_info(repo, revision="dev").sha == refs.branches[1].target_commit
    for rev, content in (("v1", b"one"), ("main", b"two"), ("dev", b"dev")):
        path = hf_hub_download(repo, "f.txt", revision=rev, endpoint=localhub.url,
                               cache_dir=tmp_path)
        assert read(path) == content
    with pytest.raises(HfHubHTTPError) as e:
        alice.create_tag(repo, tag="v1")
    assert status_of(e) == 409
    alice.create_tag(repo, tag="v1", exist_ok=True)
    alice.delete_tag(repo, tag="v1")
    with pytest.raises(RevisionNotFoundError):
        alice.delete_tag(repo, tag="v1")
    with pytest.raises(RevisionNotFoundError):
        alice.model_info(repo, revision="v1")
    with pytest.raises(HfHubHTTPError) as e:
        alice.create_branch(repo, branch="dev")
    assert status_of(e) == 409
    alice.delete_branch(repo, branch="dev")
    assert [b.name for b in alice.list_repo_refs(repo).branches] == ["main"]


# ---- refusals, restarts, the command line


def test_malformed_requests_get_4xx_with_message(localhub, alice):
    repo = "alice/lh-malformed"
    alice.create_repo(repo)
    header = json.dumps({"key": "header", "value": {"summary": "x"}})
    bogus = json.dumps({"key": "bogus", "value": {"path": "a.txt"}})
    r = raw(localhub, "POST", f"/api/models/{repo}/commit/main",
            content=f"{header}\n{bogus}\n".encode(),
            headers={"authorization": f"Bearer {ALICE}", "content-type": "application/x-ndjson"})
    assert r.status_code == 400 and "unknown key 'bogus'" in r.json()["error"]
    with pytest.raises(BadRequestError, match="unknown key 'bogus'"):
        hf_raise_for_status(r)
    extra = json.dumps({"key": "header", "value": {"summary": "x", "author": "eve"}})
    r = raw(localhub, "POST", f"/api/models/{repo}/commit/main", content=extra.encode(),
            headers={"authorization": f"Bearer {ALICE}", "content-type": "application/x-ndjson"})
    assert r.status_code == 400 and "author" in r.headers["x-error-message"]
    r = raw(localhub, "POST", "/api/repos/create", json={"name": "lh-x", "flavour": "vanilla"})
    assert r.status_code == 400 and "flavour" in r.json()["error"]
    r = raw(localhub, "POST", "/api/repos/create", content=b"{not json")
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = raw(localhub, "GET", "/api/models", params={"inference": "warm"})
    assert r.status_code == 400 and "inference" in r.json()["error"]
    r = raw(localhub, "GET", "/api/spaces/alice/x")
    assert r.status_code == 400 and "not supported" in r.json()["error"]
    r = raw(localhub, "POST", f"/api/models/{repo}/xet-write-token/main")
    assert r.status_code == 400 and "HF_HUB_DISABLE_XET" in r.json()["error"]
    assert alice.list_repo_files(repo) == [".gitattributes"]  # nothing was committed


def test_restart_keeps_everything(tmp_path):
    directory = tmp_path / "hub"
    hub = LocalHub(directory).start()
    hub.add_user("carol", "hf_carol_token")
    api = HfApi(endpoint=hub.url, token="hf_carol_token")
    api.create_repo("carol/keep", private=True)
    st = weights(tmp_path / "w.safetensors")
    sha = api.create_commit("carol/keep", adds({"w.safetensors": st, "README.md": card(
        base_model="carol/base")}), commit_message="w").oid
    api.create_tag("carol/keep", tag="v1")
    api.create_discussion("carol/keep", "Remember me")
    old_url = hub.url
    hub.stop()
    with pytest.raises(Exception):  # noqa: B017 - whatever the client calls a refused connection
        HfApi(endpoint=old_url, token="hf_carol_token").whoami()
    with LocalHub(directory) as again:
        api = HfApi(endpoint=again.url, token="hf_carol_token")
        assert api.whoami()["name"] == "carol"
        info = api.model_info("carol/keep")
        assert info.sha == sha and info.private and "base_model:finetune:carol/base" in info.tags
        assert api.list_repo_refs("carol/keep").tags[0].target_commit == sha
        assert [d.title for d in api.get_repo_discussions("carol/keep")] == ["Remember me"]
        path = hf_hub_download("carol/keep", "w.safetensors", endpoint=again.url,
                               token="hf_carol_token", cache_dir=tmp_path / "cache")
        assert read(path) == st


def test_one_server_per_directory_and_user_checks(tmp_path):
    with LocalHub(tmp_path / "hub") as first:
        with pytest.raises(HubError, match="already served"):
            LocalHub(tmp_path / "hub").start()
        with pytest.raises(UsageError):
            first.add_user("bad name", "hf_token_1234")
        first.add_user("erin", "hf_erin_token")
        with pytest.raises(UsageError, match="another user"):
            first.add_user("frank", "hf_erin_token")
        with pytest.raises(UsageError, match="organization"):
            first.add_user("erin2", "hf_erin2_token", orgs=["erin"])
    with LocalHub(tmp_path / "hub") as second:  # the lock goes with the server
        assert HfApi(endpoint=second.url, token="hf_erin_token").whoami()["name"] == "erin"


def test_cli_hub_serve(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "hub", "serve", str(tmp_path / "hub"), "--port", "0",
         "--user", "dave:hf_dave_token:lh-org", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = json.loads(proc.stdout.readline())
        api = HfApi(endpoint=started["url"], token="hf_dave_token")
        me = api.whoami()
        assert me["name"] == "dave" and [o["name"] for o in me["orgs"]] == ["lh-org"]
        assert api.create_repo("lh-org/served").repo_id == "lh-org/served"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert started["url"] in err and "stopped" in err
