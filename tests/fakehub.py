"""An in-memory imitation of the Hugging Face Hub HTTP API on 127.0.0.1, for tests that must never touch the network.

It answers the calls huggingface_hub 2.4 (httpx2-based) makes for:

* ``HfApi.whoami`` (``GET /api/whoami-v2``);
* ``HfApi.create_repo`` / ``delete_repo`` (``POST /api/repos/create``, ``DELETE /api/repos/delete``);
* ``HfApi.model_info`` / ``repo_info`` / ``repo_exists`` / ``revision_exists``
  (``GET /api/models/{repo}[/revision/{rev}]``), ``list_repo_tree`` / ``list_repo_files``
  (``GET /api/models/{repo}/tree/{rev}[/{path}]``), ``list_repo_refs``, ``list_repo_commits``, ``create_branch`` /
  ``delete_branch``;
* ``hf_hub_download`` / ``snapshot_download`` / ``file_exists``: ``HEAD`` and ``GET`` on
  ``/{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit`` and ``ETag`` (git blob sha1) for regular files; files the
  Hub would keep in LFS (the default ``.gitattributes`` patterns, e.g. ``*.safetensors``, ``*.bin``, ``*.model``, or
  10 MB and more) answer ``302`` with ``X-Linked-Etag`` (their sha256) and ``X-Linked-Size`` towards a second server
  on another port, the "CDN", which the client fetches *without* the Authorization header, as it does the real CDN;
* ``HfApi.upload_folder`` / ``upload_file`` / ``create_commit`` / ``delete_file``: ``POST .../preupload/{rev}`` (always
  ``uploadMode: "regular"`` so content arrives inline, base64, in the NDJSON body of ``POST .../commit/{rev}``, which
  also takes deletions, ``parentCommit`` and ``?create_pr=1``), plus ``POST .../discussions`` and
  ``GET .../discussions/{num}`` because with ``hf_xet`` installed ``upload_folder(create_pr=True)`` opens the pull
  request first and then commits to ``refs/pr/N``;
* ``ModelCard.validate`` and the README check of ``create_commit`` (``POST /api/validate-yaml``, plain text or JSON
  errors as the client expects them), with a small real subset of the Hub's metadata rules (:func:`validate_metadata`);
  commits whose ``README.md`` front matter breaks them are refused with 400, as on the Hub.

Anything else is answered ``404`` with a JSON error and recorded in :attr:`FakeHub.unexpected`; every request is
recorded in :attr:`FakeHub.requests` with its Authorization header reduced to the token's *name*.

Revisions: branch names, ``refs/heads/X``, tags (``refs/tags/X``), ``refs/pr/N``, full or abbreviated (4+ hex digits,
unique) commit shas. Errors carry the ``X-Error-Code`` header the client turns into ``RepositoryNotFoundError``
(``RepoNotFound``; ``401`` without a token, ``404`` with one, as on the Hub), ``RevisionNotFoundError``
(``RevisionNotFound``) or ``RemoteEntryNotFoundError`` (``EntryNotFound``). An Authorization header with an unknown
token is refused with ``401 Invalid credentials in Authorization header`` on every route, public repos included.

Not imitated: LFS/Xet *uploads* (nothing asks for them, since preupload says "regular"), gated repos, pagination
(every listing is one page), Spaces hardware, webhooks, search.

Use in tests through the :func:`fake_hub` fixture::

    from fakehub import fake_hub_fixture  # noqa: F401  (registers the ``fake_hub`` fixture in the module)

    def test_something(fake_hub):
        sha = fake_hub.add_repo("alice/m", {"config.json": b"{}"})
        path = snapshot_download("alice/m")          # in-process: reaches the fake
        subprocess.run(["driftmerge", ...])          # subprocesses: HF_ENDPOINT etc. point at it too
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import http.server
import itertools
import json
import os
import re
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

# ----------------------------------------------------------------------------------------------------------------------
# Users and tokens every FakeHub knows unless built with default_users=False

ALICE_TOKEN = "hf_fakehub_alice_write"  # alice, role "write", member of org "alice-lab"
ALICE_READ_TOKEN = "hf_fakehub_alice_read"  # alice, role "read"
BOB_TOKEN = "hf_fakehub_bob_write"  # bob, role "write", no org

# The Hub's license identifiers (hub-docs, docs/hub/repositories-licenses.md, plus the llama3.x ids added since).
# fmt: off
HUB_LICENSES = frozenset([
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
    "etalab-2.0", "eupl-1.1", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0",
    "isc", "lppl-1.3c", "ms-pl", "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1",
    "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license", "llama2", "llama3", "llama3.1",
    "llama3.2", "llama3.3", "gemma", "unknown", "other",
])
# fmt: on

# The pipeline tags a model card may declare (the common part of the Hub's task list).
# fmt: off
PIPELINE_TAGS = frozenset([
    "text-classification", "token-classification", "table-question-answering", "question-answering",
    "zero-shot-classification", "translation", "summarization", "feature-extraction", "text-generation",
    "text2text-generation", "fill-mask", "sentence-similarity", "text-to-speech", "text-to-audio",
    "automatic-speech-recognition", "audio-to-audio", "audio-classification", "voice-activity-detection",
    "depth-estimation", "image-classification", "object-detection", "image-segmentation", "text-to-image",
    "image-to-text", "image-to-image", "image-to-video", "unconditional-image-generation", "video-classification",
    "reinforcement-learning", "robotics", "tabular-classification", "tabular-regression", "tabular-to-text",
    "table-to-text", "multiple-choice", "text-ranking", "text-retrieval", "time-series-forecasting",
    "text-to-video", "image-text-to-text", "visual-question-answering", "document-question-answering",
    "zero-shot-image-classification", "graph-ml", "mask-generation", "zero-shot-object-detection", "text-to-3d",
    "image-to-3d", "image-feature-extraction", "video-text-to-text", "keypoint-detection",
    "visual-document-retrieval", "any-to-any", "audio-text-to-text", "other",
])
# fmt: on

BASE_MODEL_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})

# The patterns of the .gitattributes the Hub writes into every new repo: files matching them live in LFS.
# fmt: off
DEFAULT_LFS_PATTERNS = [
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
    "*.xz", "*.zip", "*.zst", "*tfevents*",
]
# fmt: on
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files above 10 MB

GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_LFS_PATTERNS).encode()

_REPO_ID = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")
_YAML_BLOCK = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_HEX = re.compile(r"^[0-9a-f]{4,40}$")
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub answers as ETag / oid for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def front_matter(text: str) -> tuple[bool, Any, str | None]:
    """(has a YAML block, its parsed value, the YAML error) of a card's text."""
    m = _YAML_BLOCK.search(text)
    if m is None:
        return False, None, None
    try:
        return True, yaml.safe_load(m.group(2)), None
    except yaml.YAMLError as exc:
        return True, None, str(exc).replace("\n", " ")


def _is_repo_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and _REPO_ID.match(value) is not None
        and "--" not in value
        and ".." not in value
        and not any(part.startswith(("-", ".")) or part.endswith(("-", ".")) for part in value.split("/"))
    )


def _str_or_str_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def validate_metadata(
    content: str, repo_type: str = "model", licenses: frozenset[str] | set[str] = HUB_LICENSES
) -> tuple[list[str], list[str]]:
    """The Hub's checks of a card's YAML front matter, a small real subset of them: (errors, warnings).

    The YAML must parse to a mapping; ``license`` one of ``licenses`` (default :data:`HUB_LICENSES`) or a list of
    them; ``base_model`` a
    repo id or a list of them; ``base_model_relation`` adapter/merge/quantized/finetune; ``tags``, ``datasets``,
    ``language`` a string or a list of strings; ``library_name``, ``license_name``, ``license_link`` strings;
    ``pipeline_tag`` one of :data:`PIPELINE_TAGS`; ``model-index`` a list.
    """
    has_block, meta, error = front_matter(content)
    if error is not None:
        return [f"Error parsing YAML metadata: {error}"], []
    if not has_block or meta is None or meta == {}:
        return [], ["empty or missing yaml metadata in repo card"]
    if not isinstance(meta, dict):
        return ['"metadata" must be of type object'], []
    errors: list[str] = []
    lic = meta.get("license")
    if lic is not None:
        values = lic if isinstance(lic, list) else [lic]
        if not values or not all(isinstance(v, str) and v in licenses for v in values):
            errors.append(f'"license" must be one of [{", ".join(sorted(licenses))}]; got {lic!r}')
    for key in ("license_name", "license_link", "library_name"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "language"):
        if key in meta and not _str_or_str_list(meta[key]):
            errors.append(f'"{key}" must be a string or an array of strings')
    if repo_type == "model":
        if "base_model" in meta:
            bm = meta["base_model"]
            ok = _is_repo_id(bm) or (isinstance(bm, list) and len(bm) > 0 and all(_is_repo_id(v) for v in bm))
            if not ok:
                errors.append(
                    f'"base_model" must be a Hub repo id (name or namespace/name) or a list of them; got {bm!r}'
                )
        if "base_model_relation" in meta and meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of [{", ".join(sorted(BASE_MODEL_RELATIONS))}]')
        if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
            errors.append(f'"pipeline_tag" must be one of the Hub\'s tasks; got {meta["pipeline_tag"]!r}')
        if "model-index" in meta and not isinstance(meta["model-index"], list):
            errors.append('"model-index" must be an array')
    return errors, []


# ----------------------------------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class Token:
    value: str
    name: str  # what FakeHub.requests shows instead of the secret
    user: str
    role: str  # "write" | "read"


@dataclass
class Commit:
    oid: str
    parents: list[str]
    files: dict[str, bytes]
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class Discussion:
    num: int
    title: str
    author: str
    is_pull_request: bool
    status: str
    description: str
    created_at: datetime
    base: str | None = None  # the PR's target branch


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: datetime
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)  # num -> head of refs/pr/num
    discussions: dict[int, Discussion] = field(default_factory=dict)
    obj_id: str = ""

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0] if "/" in self.repo_id else ""


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake answered. ``str()`` gives ``"GET /alice/m/resolve/main/config.json"``."""

    method: str
    path: str  # percent-decoded URL path, without the query
    query: str
    token: str | None  # the token's *name*; None without Authorization; "<invalid>" for an unknown token
    server: str  # "hub" or "cdn"
    status: int
    repo_id: str | None = None  # for /resolve/ and CDN requests
    revision: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})
        self.extra = extra


@dataclass
class _Request:
    method: str
    path: str  # raw (percent-encoded) path
    query: dict[str, list[str]]
    headers: Any
    body: bytes
    token: Token | None
    server: str

    def param(self, key: str) -> str | None:
        values = self.query.get(key)
        return values[-1] if values else None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as exc:
            raise HubError(400, f"Invalid JSON body: {exc}") from exc


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json; charset=utf-8"


def _json(data: Any, status: int = 200, headers: dict | None = None) -> _Response:
    return _Response(status, json.dumps(data).encode(), dict(headers or {}))


# ----------------------------------------------------------------------------------------------------------------------
# The hub


class FakeHub:
    """An in-memory Hub: state API for tests (Python) plus the HTTP server huggingface_hub talks to.

    ``FakeHub()`` knows users ``alice`` (org ``alice-lab``) and ``bob`` and the tokens :data:`ALICE_TOKEN` (name
    ``alice-write``), :data:`ALICE_READ_TOKEN` (``alice-read``) and :data:`BOB_TOKEN` (``bob-write``).
    Start it with :meth:`start` (or ``with FakeHub() as hub:``); :attr:`url` is then ``http://127.0.0.1:PORT``.
    """

    def __init__(self, *, default_users: bool = True, lfs_patterns: tuple[str, ...] | list[str] | None = None):
        self._lock = threading.RLock()
        self._users: dict[str, list[str]] = {}
        self._tokens: dict[str, Token] = {}
        self._repos: dict[tuple[str, str], Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> content, what the "CDN" serves
        self._requests: list[RecordedRequest] = []
        self._unexpected: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of requests the fake itself failed on (answered 500)
        self.lfs_patterns = tuple(DEFAULT_LFS_PATTERNS if lfs_patterns is None else lfs_patterns)
        self.licenses = set(HUB_LICENSES)  # extend to accept more license ids
        self._counter = itertools.count(1)
        self._servers: list[http.server.ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._monkeypatch: pytest.MonkeyPatch | None = None
        self.url = ""
        self.cdn_url = ""
        self.home: Path | None = None  # set by use_fake_hub: HF_HOME
        self.cache_dir: Path | None = None  # set by use_fake_hub: HF_HUB_CACHE
        if default_users:
            self.add_user("alice", orgs=["alice-lab"])
            self.add_user("bob")
            self.add_token(ALICE_TOKEN, "alice", role="write", name="alice-write")
            self.add_token(ALICE_READ_TOKEN, "alice", role="read", name="alice-read")
            self.add_token(BOB_TOKEN, "bob", role="write", name="bob-write")

    # -- server ----------------------------------------------------------------------------------------------------

    def start(self) -> FakeHub:
        for kind in ("hub", "cdn"):
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, kind))
            server.daemon_threads = True
            server.block_on_close = False  # stop() must not wait for keep-alive connections a client still holds
            # a short poll: shutdown() waits up to one interval, and every test stops two servers
            thread = threading.Thread(target=server.serve_forever, args=(0.02,), name=f"fakehub-{kind}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- users, tokens ---------------------------------------------------------------------------------------------

    def add_user(self, name: str, orgs: list[str] | tuple[str, ...] = ()) -> None:
        with self._lock:
            self._users[name] = list(orgs)

    def add_token(self, value: str, user: str, *, role: str = "write", name: str | None = None) -> str:
        """Register ``value`` as a token of ``user`` (added if unknown) with ``role`` "write" or "read"."""
        if role not in ("write", "read"):
            raise ValueError(f"role must be 'write' or 'read', not {role!r}")
        with self._lock:
            self._users.setdefault(user, [])
            self._tokens[value] = Token(value, name or f"{user}-{role}", user, role)
        return value

    def namespaces(self, user: str) -> list[str]:
        """The namespaces ``user`` may write to: itself and its orgs."""
        return [user, *self._users.get(user, [])]

    # -- repos: the state API --------------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | str | Path | None = None,
        *,
        private: bool = False,
        repo_type: str = "model",
        message: str = "Upload files",
        gitattributes: bool = True,
        author: str | None = None,
    ) -> str:
        """Create a repo (its first commit holds the Hub's default ``.gitattributes`` unless ``gitattributes=False``,
        like a repo made with ``create_repo``), then commit ``files`` (a mapping path -> bytes/str, or a local folder)
        to ``main``. Returns the head commit sha. A private repo is visible to the tokens of the user or org that is
        its namespace."""
        with self._lock:
            repo = self._new_repo(repo_id, repo_type, private, author or repo_id.split("/")[0], gitattributes)
            if files is not None:
                self._commit(repo, "main", _read_files(files), [], message, author or repo.namespace or "alice")
            return repo.branches["main"]

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | str | Path | None = None,
        *,
        delete: list[str] | tuple[str, ...] = (),
        revision: str = "main",
        message: str = "Update files",
        repo_type: str = "model",
        author: str | None = None,
    ) -> str:
        """Commit ``files`` (added/overwritten) and ``delete`` (paths; a path ending with ``/`` removes a folder) on
        branch or ``refs/pr/N`` ``revision``. Returns the new commit sha."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return self._commit(
                repo, revision, _read_files(files or {}), list(delete), message, author or repo.namespace or "alice"
            )

    def create_branch(self, repo_id: str, branch: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            repo.branches[branch] = self._resolve(repo, revision)
            return repo.branches[branch]

    def create_tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            repo.tags[tag] = self._resolve(repo, revision)
            return repo.tags[tag]

    def open_pr(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        base: str = "main",
        title: str = "Pull request",
        author: str = "bob",
        repo_type: str = "model",
    ) -> int:
        """Open a pull request against ``base`` (with one commit of ``files`` on it, if given). Returns its number."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            num = self._open_pr(repo, base, title, author, "", status="open")
            if files:
                self._commit(repo, f"refs/pr/{num}", _read_files(files), [], title, author)
            return num

    def set_private(self, repo_id: str, private: bool = True, *, repo_type: str = "model") -> None:
        with self._lock:
            self._repo(repo_id, repo_type).private = private

    def delete_repo(self, repo_id: str, *, repo_type: str = "model") -> None:
        with self._lock:
            self._repos.pop((repo_type, repo_id), None)

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """The repo's files at ``revision`` (any revision the HTTP API accepts): path -> content."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return dict(repo.commits[self._resolve(repo, revision)].files)

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """The commit sha ``revision`` names (raises :class:`HubError` 404 when it names none)."""
        with self._lock:
            return self._resolve(self._repo(repo_id, repo_type), revision)

    def refs(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """Every ref of the repo: ``{"refs/heads/main": sha, "refs/tags/v1": sha, "refs/pr/1": sha, ...}``."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            out = {f"refs/heads/{b}": s for b, s in repo.branches.items()}
            out.update({f"refs/tags/{t}": s for t, s in repo.tags.items()})
            out.update({f"refs/pr/{n}": s for n, s in repo.prs.items()})
            return out

    def history(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[Commit]:
        """The commits reachable from ``revision``, newest first (first parents only)."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            out, sha = [], self._resolve(repo, revision)
            while sha:
                out.append(repo.commits[sha])
                sha = repo.commits[sha].parents[0] if repo.commits[sha].parents else ""
            return out

    def discussions(self, repo_id: str, *, repo_type: str = "model") -> dict[int, Discussion]:
        with self._lock:
            return dict(self._repo(repo_id, repo_type).discussions)

    # -- what was asked --------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request answered so far, in order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def unexpected(self) -> list[RecordedRequest]:
        """The requests no route of the fake knows (answered 404)."""
        with self._lock:
            return list(self._unexpected)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._unexpected.clear()

    def downloaded(self, repo_id: str | None = None) -> list[str]:
        """The repo paths whose *content* was sent (GET answered 200/206 on /resolve/ or by the CDN), in order,
        repeats included; ``repo_id`` keeps one repo's. HEAD requests and errors are not downloads."""
        return [
            r.file
            for r in self.requests
            if r.method == "GET" and r.file is not None and r.status in (200, 206)
            if repo_id is None or r.repo_id == repo_id
        ]

    # -- offline mode (with the fixture) ---------------------------------------------------------------------------

    def offline(self, enabled: bool = True) -> None:
        """Switch huggingface_hub's offline mode, in process and for subprocesses (needs the :func:`fake_hub`
        fixture's monkeypatch; see :func:`offline`)."""
        if self._monkeypatch is None:
            raise RuntimeError("FakeHub.offline() needs the hub to have been installed with use_fake_hub()")
        offline(self._monkeypatch, enabled)

    # -- internals: state ------------------------------------------------------------------------------------------

    def _repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _new_repo(self, repo_id: str, repo_type: str, private: bool, author: str, gitattributes: bool) -> Repo:
        if not _is_repo_id(repo_id):
            raise HubError(400, f"Invalid repo name: {repo_id!r}")
        if (repo_type, repo_id) in self._repos:
            raise HubError(409, f"You already created this {repo_type} repo", url=self._repo_url(repo_type, repo_id))
        repo = Repo(repo_id, repo_type, private, _now())
        repo.obj_id = hashlib.sha1(f"{repo_type}/{repo_id}/{next(self._counter)}".encode()).hexdigest()[:24]
        self._repos[(repo_type, repo_id)] = repo
        files = {".gitattributes": GITATTRIBUTES} if gitattributes else {}
        self._store_commit(repo, "main", [], files, "initial commit", "", author, branch="main")
        return repo

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{_PREFIX[repo_type]}{repo_id}"

    def _store_commit(
        self,
        repo: Repo,
        ref: str,
        parents: list[str],
        files: dict[str, bytes],
        title: str,
        message: str,
        author: str,
        branch: str | None = None,
        pr: int | None = None,
    ) -> str:
        digest = hashlib.sha1()
        for p in sorted(files):
            digest.update(f"{p}\0{git_blob_sha1(files[p])}\0".encode())
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parents}\n{next(self._counter)}\n{title}\n{digest.hexdigest()}"
        oid = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parents, files, title, message, author, _now())
        for content in files.values():
            self._blobs.setdefault(hashlib.sha256(content).hexdigest(), content)
        if branch is not None:
            repo.branches[branch] = oid
        if pr is not None:
            repo.prs[pr] = oid
        return oid

    def _target(self, repo: Repo, revision: str) -> tuple[str | None, int | None]:
        """The branch or PR number a commit to ``revision`` moves; 404/400 when it names no branch or PR."""
        rev = revision.removeprefix("refs/heads/")
        if rev in repo.branches:
            return rev, None
        m = re.fullmatch(r"refs/pr/(\d+)", revision)
        if m and int(m.group(1)) in repo.prs:
            return None, int(m.group(1))
        self._resolve(repo, revision)  # raises RevisionNotFound for what does not exist
        raise HubError(400, f"Invalid rev id: {revision} is not a branch or a pull request ref")

    def _commit(
        self,
        repo: Repo,
        revision: str,
        add: dict[str, bytes],
        delete: list[str],
        title: str,
        author: str,
        message: str = "",
        parent_commit: str | None = None,
    ) -> str:
        branch, pr = self._target(repo, revision)
        head = repo.branches[branch] if branch is not None else repo.prs[pr]  # type: ignore[index]
        if parent_commit is not None and not head.startswith(parent_commit):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files)
        for path in delete:
            if path.endswith("/"):
                gone = [p for p in files if p.startswith(path)]
                if not gone:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                for p in gone:
                    del files[p]
            elif path in files:
                del files[path]
            else:
                raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
        for path, content in add.items():
            _check_path(path)
            files[path] = content
        if "README.md" in add:
            errors, _ = validate_metadata(add["README.md"].decode("utf-8", "replace"), repo.repo_type, self.licenses)
            if errors:
                raise HubError(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
        return self._store_commit(repo, revision, [head], files, title, message, author, branch=branch, pr=pr)

    def _open_pr(self, repo: Repo, base: str, title: str, author: str, description: str, status: str) -> int:
        base_branch = base.removeprefix("refs/heads/")
        if base_branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {base}", "RevisionNotFound")
        num = max(repo.discussions, default=0) + 1
        repo.discussions[num] = Discussion(num, title, author, True, status, description, _now(), base_branch)
        repo.prs[num] = repo.branches[base_branch]
        return num

    def _resolve(self, repo: Repo, revision: str) -> str:
        rev = revision
        if rev.startswith("refs/heads/") and rev[len("refs/heads/") :] in repo.branches:
            return repo.branches[rev[len("refs/heads/") :]]
        if rev.startswith("refs/tags/") and rev[len("refs/tags/") :] in repo.tags:
            return repo.tags[rev[len("refs/tags/") :]]
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m.group(1)) in repo.prs:
            return repo.prs[int(m.group(1))]
        if _HEX.match(rev):
            found = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _is_lfs(self, path: str, content: bytes) -> bool:
        name = path.rsplit("/", 1)[-1]
        return len(content) >= LFS_SIZE_THRESHOLD or any(
            fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in self.lfs_patterns
        )

    # -- internals: HTTP -------------------------------------------------------------------------------------------

    def _can_read(self, token: Token | None, repo: Repo) -> bool:
        return not repo.private or (token is not None and repo.namespace in self.namespaces(token.user))

    def _read_repo(self, req: _Request, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or not self._can_read(req.token, repo):
            if req.token is None:  # the Hub answers 401 to anonymous requests for missing or private repos
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _write_repo(self, req: _Request, repo_type: str, repo_id: str, *, pr_author_ok: int | None = None) -> Repo:
        """The repo, when ``req``'s token may push to it (or, ``pr_author_ok``, to that PR it opened)."""
        repo = self._read_repo(req, repo_type, repo_id)
        token = req.token
        if token is None:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        if token.role != "write":
            raise HubError(403, f"Forbidden: the token '{token.name}' is read-only")
        if repo.namespace in self.namespaces(token.user):
            return repo
        pr = repo.discussions.get(pr_author_ok) if pr_author_ok is not None else None
        if pr is not None and pr.author == token.user:
            return repo
        raise HubError(403, f"You don't have the rights to push to {repo_id}: {token.user} is not in its namespace")

    def _pushable_repo(self, req: _Request, repo_type: str, repo_id: str, rev: str, *, create_pr: bool) -> Repo:
        """The repo when ``req`` may commit to ``rev`` of it: a member's write token; for ``refs/pr/N`` also the PR's
        author; with ``create_pr`` any write token that sees the repo (opening a PR needs no membership)."""
        if not create_pr:
            pr = re.fullmatch(r"refs/pr/(\d+)", rev)
            return self._write_repo(req, repo_type, repo_id, pr_author_ok=int(pr.group(1)) if pr else None)
        repo = self._read_repo(req, repo_type, repo_id)
        if req.token is None:
            raise HubError(401, "Invalid username or password.", "RepoNotFound")
        if req.token.role != "write":
            raise HubError(403, f"Forbidden: the token '{req.token.name}' is read-only")
        return repo

    def _dispatch(self, req: _Request) -> tuple[_Response, dict[str, str | None]]:
        """Route a request; returns the response and what to record about it (repo_id, revision, file)."""
        path = req.path
        info: dict[str, str | None] = {}
        if req.server == "cdn":
            m = re.fullmatch(r"/lfs/([0-9a-f]{64})", path)
            if m is None or req.method not in ("GET", "HEAD") or m.group(1) not in self._blobs:
                raise _Unknown()
            info = {"repo_id": req.param("repo"), "revision": req.param("commit"), "file": req.param("path")}
            return _file_response(req, self._blobs[m.group(1)], {}), info
        if req.headers.get("Authorization") is not None and req.token is None:
            raise HubError(401, "Invalid credentials in Authorization header")

        api = r"/api/(?P<t>models|datasets|spaces)/(?P<repo>[^/]+(?:/[^/]+)?)"
        routes: list[tuple[str, str, Any]] = [
            ("GET", r"/api/whoami-v2", self._h_whoami),
            ("POST", r"/api/repos/create", self._h_create_repo),
            ("DELETE", r"/api/repos/delete", self._h_delete_repo),
            ("POST", r"/api/validate-yaml", self._h_validate_yaml),
            ("GET", api + r"/revision/(?P<rev>[^/]+)", self._h_repo_info),
            ("GET", api + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self._h_tree),
            ("GET", api + r"/refs", self._h_refs),
            ("GET", api + r"/commits/(?P<rev>[^/]+)", self._h_commits),
            ("POST", api + r"/preupload/(?P<rev>[^/]+)", self._h_preupload),
            ("POST", api + r"/commit/(?P<rev>[^/]+)", self._h_commit),
            ("POST", api + r"/branch/(?P<branch>[^/]+)", self._h_create_branch),
            ("DELETE", api + r"/branch/(?P<branch>[^/]+)", self._h_delete_branch),
            ("POST", api + r"/discussions", self._h_create_discussion),
            ("GET", api + r"/discussions/(?P<num>\d+)", self._h_discussion),
            ("GET", api, self._h_repo_info),
        ]
        for method, pattern, handler in routes:
            m = re.fullmatch(pattern, path)
            if m is not None and req.method == method:
                args = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items() if v is not None}
                if "t" in args:
                    args["t"] = _TYPES[args["t"]]
                return handler(req, **args), info
        m = re.fullmatch(
            r"/(?:(?P<tp>datasets|spaces)/)?(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", path
        )
        if m is not None and req.method in ("GET", "HEAD") and not path.startswith("/api/"):
            repo_type = _TYPES[m.group("tp")] if m.group("tp") else "model"
            repo_id, rev = urllib.parse.unquote(m.group("repo")), urllib.parse.unquote(m.group("rev"))
            file = urllib.parse.unquote(m.group("path"))
            info = {"repo_id": repo_id, "revision": rev, "file": file}
            return self._h_resolve(req, repo_type, repo_id, rev, file), info
        raise _Unknown()

    # -- handlers --------------------------------------------------------------------------------------------------

    def _h_whoami(self, req: _Request) -> _Response:
        token = req.token
        if token is None:
            raise HubError(401, "Invalid username or password.")
        orgs = [
            {"type": "org", "name": org, "fullname": org, "roleInOrg": "admin", "isEnterprise": False}
            for org in self._users.get(token.user, [])
        ]
        return _json(
            {
                "type": "user",
                "id": hashlib.sha1(token.user.encode()).hexdigest()[:24],
                "name": token.user,
                "fullname": token.user.capitalize(),
                "email": f"{token.user}@example.com",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": orgs,
                "auth": {
                    "type": "access_token",
                    "accessToken": {
                        "displayName": token.name,
                        "role": token.role,
                        "createdAt": "2024-01-01T00:00:00.000Z",
                    },
                },
            }
        )

    def _h_create_repo(self, req: _Request) -> _Response:
        body = req.json()
        token = req.token
        if token is None:
            raise HubError(401, "Invalid username or password.")
        repo_type = body.get("type") or "model"
        if repo_type not in _PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type!r}")
        name, namespace = body.get("name"), body.get("organization") or token.user
        if not isinstance(name, str) or not name:
            raise HubError(400, '"name" is required')
        if token.role != "write" or namespace not in self.namespaces(token.user):
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo_id = f"{namespace}/{name}"
        repo = self._new_repo(repo_id, repo_type, private, token.user, gitattributes=True)
        return _json({"url": self._repo_url(repo_type, repo_id), "name": repo_id, "id": repo.obj_id})

    def _h_delete_repo(self, req: _Request) -> _Response:
        body = req.json()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or (req.token.user if req.token is not None else None)
        repo_id = f"{namespace}/{body.get('name')}" if namespace else str(body.get("name"))
        self._write_repo(req, repo_type, repo_id)
        del self._repos[(repo_type, repo_id)]
        return _Response(200, b"", content_type="text/plain")

    def _h_validate_yaml(self, req: _Request) -> _Response:
        body = req.json()
        errors, warnings = validate_metadata(
            str(body.get("content", "")), body.get("repoType") or "model", self.licenses
        )
        status = 400 if errors else 200
        if "text/plain" in (req.headers.get("Accept") or ""):
            text = "\n".join(f"- {e}" for e in errors) if errors else "OK"
            return _Response(status, text.encode(), content_type="text/plain; charset=utf-8")
        return _json(
            {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}, status
        )

    def _h_repo_info(self, req: _Request, t: str, repo: str, rev: str = "main") -> _Response:
        r = self._read_repo(req, t, repo)
        sha = self._resolve(r, rev)
        commit = r.commits[sha]
        blobs = req.param("blobs") in ("1", "true", "True")
        siblings = []
        for path in sorted(commit.files):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(self._file_meta(path, commit.files[path], sha_key="sha256"))
            siblings.append(sib)
        card = commit.files.get("README.md")
        _, meta, _ = front_matter(card.decode("utf-8", "replace")) if card is not None else (False, None, None)
        data: dict[str, Any] = {
            "_id": r.obj_id,
            "id": r.repo_id,
            "author": r.namespace or None,
            "sha": sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(r.created_at),
            "private": r.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(len(c) for c in commit.files.values()),
        }
        if t == "model":
            data["modelId"] = r.repo_id
        if isinstance(meta, dict):
            data["cardData"] = meta
            tags = meta.get("tags")
            data["tags"] = [tags] if isinstance(tags, str) else [str(x) for x in tags or []]
            if isinstance(meta.get("license"), str):
                data["tags"].append(f"license:{meta['license']}")
            if t == "model":
                for key in ("library_name", "pipeline_tag"):
                    if isinstance(meta.get(key), str):
                        data[key] = meta[key]
        if t == "model" and "config.json" in commit.files:
            with contextlib.suppress(ValueError):
                config = json.loads(commit.files["config.json"])
                if isinstance(config, dict):
                    data["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        expand = req.query.get("expand") or req.query.get("expand[]")
        if expand:
            data = {k: v for k, v in data.items() if k in ("_id", "id", *expand)}
        return _json(data)

    def _file_meta(self, path: str, content: bytes, sha_key: str = "oid") -> dict[str, Any]:
        """Size, blob id and LFS info of a file, as the tree (``sha_key="oid"``) or siblings list them."""
        if self._is_lfs(path, content):
            pointer = lfs_pointer(content)
            oid_key = "oid" if sha_key == "oid" else "blobId"
            lfs = {sha_key: hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": len(pointer)}
            return {oid_key: git_blob_sha1(pointer), "size": len(content), "lfs": lfs}
        return {"oid" if sha_key == "oid" else "blobId": git_blob_sha1(content), "size": len(content)}

    def _h_tree(self, req: _Request, t: str, repo: str, rev: str, path: str = "") -> _Response:
        r = self._read_repo(req, t, repo)
        commit = r.commits[self._resolve(r, rev)]
        recursive = (req.param("recursive") or "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        entries: dict[str, dict[str, Any]] = {}
        for p in sorted(commit.files):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix) :].split("/")
            for depth in range(1, len(rest)):  # the folders on the way
                if not recursive and depth > 1:
                    break
                folder = prefix + "/".join(rest[:depth])
                oid = hashlib.sha1(f"tree {commit.oid} {folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(rest) == 1:
                entries[p] = {"type": "file", "path": p, **self._file_meta(p, commit.files[p])}
        return _json(list(entries.values()))

    def _h_refs(self, req: _Request, t: str, repo: str) -> _Response:
        r = self._read_repo(req, t, repo)
        return _json(
            {
                "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in r.branches.items()],
                "converts": [],
                "tags": [{"name": g, "ref": f"refs/tags/{g}", "targetCommit": s} for g, s in r.tags.items()],
                "pullRequests": [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s} for n, s in r.prs.items()
                ],
            }
        )

    def _h_commits(self, req: _Request, t: str, repo: str, rev: str) -> _Response:
        r = self._read_repo(req, t, repo)
        self._resolve(r, rev)
        return _json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author}],
                    "date": _iso(c.date),
                }
                for c in self.history(r.repo_id, rev, repo_type=t)
            ]
        )

    def _h_preupload(self, req: _Request, t: str, repo: str, rev: str) -> _Response:
        r = self._pushable_repo(req, t, repo, rev, create_pr=req.param("create_pr") == "1")
        head = r.commits[self._resolve(r, rev)]
        body = req.json()
        gitignore = body.get("gitIgnore")
        if gitignore is None and ".gitignore" in head.files:
            gitignore = head.files[".gitignore"].decode("utf-8", "replace")
        ignore = [ln.strip() for ln in (gitignore or "").splitlines() if ln.strip() and not ln.startswith("#")]
        files = []
        for f in body.get("files", []):
            p = f["path"]
            ignored = any(fnmatch.fnmatch(p, g) or fnmatch.fnmatch(p.rsplit("/", 1)[-1], g) for g in ignore)
            oid = git_blob_sha1(head.files[p]) if p in head.files else None
            files.append({"path": p, "uploadMode": "regular", "shouldIgnore": ignored, "oid": oid})
        return _json({"files": files, "commitOid": head.oid})

    def _h_commit(self, req: _Request, t: str, repo: str, rev: str) -> _Response:
        create_pr = req.param("create_pr") == "1"
        r = self._pushable_repo(req, t, repo, rev, create_pr=create_pr)
        header: dict[str, Any] = {}
        add: dict[str, bytes] = {}
        delete: list[str] = []
        for line in req.body.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as exc:
                raise HubError(400, f"Invalid commit payload line: {line[:200]!r} ({exc})") from exc
            if key == "header":
                header = value
            elif key == "file":
                content = value.get("content", "")
                if value.get("encoding") == "base64":
                    add[value["path"]] = base64.b64decode(content)
                else:
                    add[value["path"]] = content.encode() if isinstance(content, str) else bytes(content)
            elif key == "lfsFile":  # only a copy of content the hub already holds (LFS uploads are not imitated)
                blob = self._blobs.get(value.get("oid", ""))
                if blob is None:
                    raise HubError(400, f"LFS object {value.get('oid')} for {value.get('path')} was never uploaded")
                add[value["path"]] = blob
            elif key == "deletedFile":
                delete.append(value["path"].rstrip("/"))
            elif key == "deletedFolder":
                delete.append(value["path"].rstrip("/") + "/")
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        summary = header.get("summary") or ""
        if not summary:
            raise HubError(400, "Commit summary is required")
        assert req.token is not None
        pr_num = None
        target = rev
        if create_pr:
            base = rev.removeprefix("refs/heads/")
            if base not in r.branches:
                self._resolve(r, rev)
                raise HubError(400, f"Invalid rev id: {rev} is not a branch")
            pr_num = self._open_pr(r, base, summary, req.token.user, header.get("description") or "", status="open")
            target = f"refs/pr/{pr_num}"
        oid = self._commit(
            r,
            target,
            add,
            delete,
            summary,
            req.token.user,
            message=header.get("description") or "",
            parent_commit=header.get("parentCommit"),
        )
        data = {"success": True, "commitOid": oid, "commitUrl": f"{self._repo_url(t, r.repo_id)}/commit/{oid}"}
        data["hookOutput"] = ""
        if pr_num is not None:
            data["pullRequestUrl"] = f"{self._repo_url(t, r.repo_id)}/discussions/{pr_num}"
        return _json(data)

    def _h_create_branch(self, req: _Request, t: str, repo: str, branch: str) -> _Response:
        r = self._write_repo(req, t, repo)
        if branch in r.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = (req.json() or {}).get("startingPoint") or "main"
        r.branches[branch] = self._resolve(r, start)
        return _json({})

    def _h_delete_branch(self, req: _Request, t: str, repo: str, branch: str) -> _Response:
        r = self._write_repo(req, t, repo)
        if branch not in r.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        del r.branches[branch]
        return _json({})

    def _h_create_discussion(self, req: _Request, t: str, repo: str) -> _Response:
        r = self._read_repo(req, t, repo)
        if req.token is None or req.token.role != "write":
            raise HubError(403, "Forbidden: opening a discussion needs a write token")
        body = req.json()
        title, description = str(body.get("title") or ""), str(body.get("description") or "")
        if len(title) < 3:
            raise HubError(400, '"title" must be at least 3 characters long')
        if body.get("pullRequest"):
            num = self._open_pr(r, "main", title, req.token.user, description, status="draft")
        else:
            num = max(r.discussions, default=0) + 1
            r.discussions[num] = Discussion(num, title, req.token.user, False, "open", description, _now())
        return _json({"num": num, "url": f"{self._repo_url(t, r.repo_id)}/discussions/{num}"})

    def _h_discussion(self, req: _Request, t: str, repo: str, num: str) -> _Response:
        r = self._read_repo(req, t, repo)
        d = r.discussions.get(int(num))
        if d is None:
            raise HubError(404, "Discussion not found")
        event = {
            "id": hashlib.sha1(f"{r.obj_id}/{d.num}".encode()).hexdigest()[:24],
            "type": "comment",
            "createdAt": _iso(d.created_at),
            "author": {"name": d.author},
            "data": {"edited": False, "hidden": False, "latest": {"raw": d.description}},
        }
        data: dict[str, Any] = {
            "num": d.num,
            "title": d.title,
            "status": d.status,
            "isPullRequest": d.is_pull_request,
            "createdAt": _iso(d.created_at),
            "author": {"name": d.author},
            "repo": {"name": r.repo_id, "type": t},
            "events": [event],
            "diff": "",
        }
        if d.is_pull_request:
            data["changes"] = {"base": f"refs/heads/{d.base}"}
            data["filesWithConflicts"] = []
        return _json(data)

    def _h_resolve(self, req: _Request, repo_type: str, repo_id: str, rev: str, file: str) -> _Response:
        r = self._read_repo(req, repo_type, repo_id)
        sha = self._resolve(r, rev)
        files = r.commits[sha].files
        if file not in files:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        content = files[file]
        headers = {"X-Repo-Commit": sha}
        if not self._is_lfs(file, content):
            headers["ETag"] = f'"{git_blob_sha1(content)}"'
            return _file_response(req, content, headers)
        sha256 = hashlib.sha256(content).hexdigest()
        query = urllib.parse.urlencode({"repo": repo_id, "commit": sha, "path": file})
        location = f"{self.cdn_url}/lfs/{sha256}?{query}"
        headers.update(
            {
                "ETag": f'"{git_blob_sha1(lfs_pointer(content))}"',
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(content)),
                "Location": location,
            }
        )
        return _Response(302, f"Found. Redirecting to {location}".encode(), headers, "text/plain; charset=utf-8")

    # -- one HTTP exchange -----------------------------------------------------------------------------------------

    def _serve(self, handler: http.server.BaseHTTPRequestHandler, server: str) -> None:
        split = urllib.parse.urlsplit(handler.path)
        body = _read_body(handler)
        auth = handler.headers.get("Authorization")
        secret = auth[7:].strip() if auth and auth.lower().startswith("bearer ") else None
        with self._lock:
            token = self._tokens.get(secret) if secret else None
            req = _Request(
                handler.command,
                split.path,
                urllib.parse.parse_qs(split.query, keep_blank_values=True),
                handler.headers,
                body,
                token,
                server,
            )
            unknown = False
            info: dict[str, str | None] = {}
            try:
                response, info = self._dispatch(req)
            except HubError as exc:
                response = _error_response(exc)
            except _Unknown:
                unknown = True
                response = _json({"error": f"Fake hub: no route for {req.method} {split.path}"}, 404)
            except Exception:
                self.errors.append(f"{req.method} {handler.path}\n{traceback.format_exc()}")
                response = _json({"error": f"Fake hub crashed on {req.method} {split.path}"}, 500)
            record = RecordedRequest(
                method=req.method,
                path=urllib.parse.unquote(split.path),
                query=split.query,
                token=None if auth is None else token.name if token is not None else "<invalid>",
                server=server,
                status=response.status,
                repo_id=info.get("repo_id"),
                revision=info.get("revision"),
                file=info.get("file"),
            )
            self._requests.append(record)
            if unknown:
                self._unexpected.append(record)
        _write_response(handler, response)


class _Unknown(Exception):
    """No route matches."""


def _read_files(files: Mapping[str, bytes | str] | str | Path) -> dict[str, bytes]:
    if isinstance(files, (str, Path)):
        root = Path(files)
        out = {}
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and not rel.startswith((".git/", ".cache/huggingface/")):
                out[rel] = p.read_bytes()
        return out
    return {k: v.encode() if isinstance(v, str) else bytes(v) for k, v in files.items()}


def _check_path(path: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts or "" in parts or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")


def _error_response(exc: HubError) -> _Response:
    headers = dict(exc.headers)
    if exc.code is not None:
        headers["X-Error-Code"] = exc.code
    headers["X-Error-Message"] = exc.message.splitlines()[0].encode("ascii", "replace").decode()
    return _json({"error": exc.message, **exc.extra}, exc.status, headers)


def _file_response(req: _Request, content: bytes, headers: dict[str, str]) -> _Response:
    headers = {**headers, "Accept-Ranges": "bytes"}
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range") or "")
    if m is not None:
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else len(content) - 1
        if start >= len(content):
            return _Response(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return _Response(206, content[start : end + 1], headers, "application/octet-stream")
    return _Response(200, content, headers, "application/octet-stream")


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    if (handler.headers.get("Transfer-Encoding") or "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _write_response(handler: http.server.BaseHTTPRequestHandler, response: _Response) -> None:
    handler.send_response(response.status)
    handler.send_header("Content-Type", response.content_type)
    handler.send_header("Content-Length", str(len(response.body)))
    handler.send_header("X-Request-Id", f"fakehub-{next(_request_ids)}")
    for key, value in response.headers.items():
        handler.send_header(key, value)
    handler.end_headers()
    if handler.command != "HEAD" and response.body:
        handler.wfile.write(response.body)


_request_ids = itertools.count(1)


def _make_handler(hub: FakeHub, server: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's pooled connections expect
        disable_nagle_algorithm = True  # headers and body go out in two writes: without this each answer waits ~40 ms

        def _any(self) -> None:
            hub._serve(self, server)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _any

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler


# ----------------------------------------------------------------------------------------------------------------------
# Pointing huggingface_hub at it


def offline(monkeypatch: pytest.MonkeyPatch, enabled: bool = True) -> None:
    """Switch huggingface_hub's offline mode for the rest of the test, in process and for subprocesses.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, into ``huggingface_hub.constants.HF_HUB_OFFLINE``; every
    request goes through a hook that calls ``constants.is_offline_mode()``, which reads that attribute, so patching it
    is what switches an already-imported client (transformers 5 asks huggingface_hub too). The environment variable
    is for subprocesses, which import afresh. Offline, a request raises ``OfflineModeIsEnabled`` before it is sent, so
    the fake sees nothing.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", enabled)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if enabled else "0")


def use_fake_hub(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, home: Path, token: str | None = ALICE_TOKEN) -> None:
    """Point huggingface_hub at ``hub`` (already started) until ``monkeypatch`` is undone, in process and for
    subprocesses, with ``home`` as HF_HOME. ``token=None`` leaves no token at all (HF_TOKEN unset, no token file).

    Environment (read by subprocesses at import): ``HF_ENDPOINT`` = hub.url, ``HF_HOME`` = home, ``HF_HUB_CACHE`` =
    home/hub, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH`` under home, ``HF_TOKEN`` = token,
    ``HF_HUB_OFFLINE=0``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_UPDATE_CHECK=1``, ``NO_PROXY`` += 127.0.0.1;
    removed: ``HUGGING_FACE_HUB_TOKEN``, ``HUGGINGFACE_HUB_CACHE``, ``HUGGINGFACE_ASSETS_CACHE``,
    ``TRANSFORMERS_OFFLINE``, ``HF_HUB_DISABLE_IMPLICIT_TOKEN``, ``HUGGINGFACE_CO_STAGING``, ``HF_OIDC_RESOURCE``,
    ``HF_OIDC_ID_TOKEN``, proxy variables.

    In process, the copies huggingface_hub made at import: in ``huggingface_hub.constants`` ENDPOINT,
    HUGGINGFACE_CO_URL_TEMPLATE (the /resolve/ URL template, built from ENDPOINT at import: without it
    ``hf_hub_download`` goes to huggingface.co), HF_URL_HOSTS, HF_HOME, HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
    HF_ASSETS_CACHE, HUGGINGFACE_ASSETS_CACHE, HF_XET_CACHE, HF_TOKEN_PATH, HF_STORED_TOKENS_PATH, the
    update-check/agent paths, HF_HUB_OFFLINE=False, HF_HUB_DISABLE_TELEMETRY=True, HF_HUB_DISABLE_IMPLICIT_TOKEN=False;
    ``huggingface_hub.hf_api.api.endpoint`` (the HfApi behind the module-level ``create_repo``, ``upload_folder``,
    ``model_info``... functions, built at import); ``utils._http._HUB_ORIGINS`` (gains the fake's origin, as it
    would with HF_ENDPOINT set at import); ``utils._cache_manager.HF_HUB_CACHE``,
    ``utils._cache_assets.HF_ASSETS_CACHE``, ``utils._git_credential.ENDPOINT``; ``transformers.utils.hub``'s
    HF_MODULES_CACHE when transformers is already imported. The shared httpx2 client is closed so that a fresh one
    (reading the new proxy settings) is made.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_assets, _cache_manager, _git_credential, _http

    home = Path(home)
    cache = home / "hub"
    assets = home / "assets"
    xet = home / "xet"
    token_path = home / "token"
    home.mkdir(parents=True, exist_ok=True)
    for name in (
        "HUGGING_FACE_HUB_TOKEN",
        "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
        "TRANSFORMERS_OFFLINE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
        "HUGGINGFACE_CO_STAGING",
        "HF_OIDC_RESOURCE",
        "HF_OIDC_ID_TOKEN",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(xet),
        "HF_TOKEN_PATH": str(token_path),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(x for x in (os.environ.get(name), "127.0.0.1", "localhost") if x)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    host = urllib.parse.urlsplit(hub.url).hostname or "127.0.0.1"
    for name, value in {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset({*constants.HF_URL_HOSTS, host}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(assets),
        "HUGGINGFACE_ASSETS_CACHE": str(assets),
        "HF_XET_CACHE": str(xet),
        "HF_TOKEN_PATH": str(token_path),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "_staging_mode": False,
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset({*_http._HUB_ORIGINS, _http._url_origin(hub.url)}))
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", str(assets))
    monkeypatch.setattr(_git_credential, "ENDPOINT", hub.url)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "HF_MODULES_CACHE"):
        monkeypatch.setattr(transformers_hub, "HF_MODULES_CACHE", str(home / "modules"))
    _http.close_session()
    hub.home, hub.cache_dir, hub._monkeypatch = home, cache, monkeypatch


@pytest.fixture(name="fake_hub")
def fake_hub_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The ``fake_hub`` fixture: a started :class:`FakeHub` that huggingface_hub talks to for the test's duration, in
    process and in subprocesses; everything is undone afterwards (see :func:`use_fake_hub` for the exact environment
    and module attributes it sets).

    * Token: ``HF_TOKEN`` = :data:`ALICE_TOKEN` (user ``alice``, write, org ``alice-lab``). Pass ``token=...`` to a
      call, or ``monkeypatch.delenv("HF_TOKEN")`` (there is no token file under HF_HOME) to act anonymously.
    * Cache: ``HF_HOME`` = ``tmp_path/"hf_home"``, ``HF_HUB_CACHE`` = ``tmp_path/"hf_home"/"hub"`` (also
      ``fake_hub.home`` / ``fake_hub.cache_dir``), so ``snapshot_download("alice/m")`` fills a per-test cache.
    * Offline: ``fake_hub.offline()`` (or ``offline(monkeypatch)``) sets ``huggingface_hub.constants.HF_HUB_OFFLINE``
      (the client read the env var at import; its request hook reads this attribute) and ``HF_HUB_OFFLINE=1`` for
      subprocesses; ``fake_hub.offline(False)`` switches back.

    The test fails at teardown when the fake itself crashed on a request (``fake_hub.errors``); unknown requests do
    not fail it: look at ``fake_hub.unexpected``.
    """
    hub = FakeHub().start()
    try:
        use_fake_hub(hub, monkeypatch, tmp_path / "hf_home")
        yield hub
    finally:
        from huggingface_hub.utils import _http

        _http.close_session()  # drop the pooled keep-alive connections to this server
        hub.stop()
    if hub.errors:
        pytest.fail("the fake hub crashed on requests:\n" + "\n".join(hub.errors), pytrace=False)


# ``from fakehub import fake_hub`` works too, but ruff then reports F811 on every test taking a ``fake_hub`` argument
# (the parameter redefines the imported name): import ``fake_hub_fixture`` instead, with a noqa for F401.
fake_hub = fake_hub_fixture
