"""Self-tests of tests/fakehub.py: the real huggingface_hub client against the fake Hub, never the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import (  # noqa: F401
    ALICE_READ_TOKEN,
    ALICE_TOKEN,
    BOB_TOKEN,
    FakeHub,
    fake_hub_fixture,
    use_fake_hub,
    validate_metadata,
)
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    constants,
    create_repo,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

CARD = "---\nlicense: apache-2.0\nbase_model: meta-llama/Llama-3.1-8B\ntags:\n- driftmerge\n---\n# A model\n"
MODEL_FILES = {
    "config.json": b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}',
    "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 8,
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer.model": b"sentencepiece" * 10,
    "README.md": CARD.encode(),
    "optimizer.pt": b"not wanted" * 100,
    "original/consolidated.safetensors": b"nested copy" * 50,
}
WEIGHTS_AND_SIDE = ["*.safetensors", "config.json", "tokenizer*", "README.md"]


@pytest.fixture(params=["xet", "no-xet"])
def upload_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``upload_folder`` takes a different road with hf_xet installed (a streamed pipeline that opens PRs with
    ``create_pull_request`` first) than without (``create_commit`` with ``?create_pr=1``): exercise both."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", request.param == "no-xet")
    return request.param


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def _tree(folder: str | Path) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- whoami, create_repo --------------------------------------------------------------------------------------------


def test_whoami_tokens(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    api = HfApi()
    me = api.whoami()  # HF_TOKEN from the fixture
    assert me["name"] == "alice"
    assert [o["name"] for o in me["orgs"]] == ["alice-lab"]
    assert me["auth"]["accessToken"]["role"] == "write"
    assert api.whoami(token=ALICE_READ_TOKEN)["auth"]["accessToken"]["role"] == "read"
    assert api.whoami(token=BOB_TOKEN)["name"] == "bob"

    with pytest.raises(HfHubHTTPError) as exc:
        api.whoami(token="hf_not_a_token")
    assert exc.value.response.status_code == 401
    assert fake_hub.requests[-1].token == "<invalid>"  # recorded, never the secret itself

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(LocalTokenNotFoundError):  # the client refuses before asking anything
        HfApi().whoami()
    assert all(ALICE_TOKEN not in (r.token or "") for r in fake_hub.requests)
    assert [r.token for r in fake_hub.requests] == ["alice-write", "alice-read", "bob-write", "<invalid>"]


def test_create_repo(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    api = HfApi()
    url = api.create_repo("alice/new", private=True)
    assert url.repo_id == "alice/new" and url.startswith(fake_hub.url)
    assert fake_hub.files("alice/new") == {".gitattributes": fake_hub.files("alice/new")[".gitattributes"]}
    assert api.model_info("alice/new").private is True
    assert create_repo("short").repo_id == "alice/short"  # module-level function, token user's namespace
    assert api.create_repo("alice-lab/team").repo_id == "alice-lab/team"  # an org of the token's user

    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("alice/new")
    assert exc.value.response.status_code == 409
    assert api.create_repo("alice/new", exist_ok=True).repo_id == "alice/new"

    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("bob/theirs")
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("alice/read-only", token=ALICE_READ_TOKEN)
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("alice/anonymous", token=False)
    assert exc.value.response.status_code == 401
    assert not isinstance(exc.value, RepositoryNotFoundError)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi().create_repo("alice/anonymous")
    assert exc.value.response.status_code == 401
    assert not fake_hub.repo_exists("bob/theirs") and not fake_hub.repo_exists("alice/anonymous")
    assert fake_hub.unexpected == []


# -- upload, download -----------------------------------------------------------------------------------------------


def test_upload_then_snapshot_with_allow_patterns(fake_hub: FakeHub, tmp_path: Path, upload_path: str) -> None:
    api = HfApi()
    api.create_repo("alice/m")
    info = api.upload_folder(folder_path=_folder(tmp_path / "up", MODEL_FILES), repo_id="alice/m", commit_message="up")
    assert len(info.oid) == 40 and info.oid == fake_hub.resolve("alice/m")
    assert info.commit_url == f"{fake_hub.url}/alice/m/commit/{info.oid}"
    assert api.model_info("alice/m").sha == info.oid
    assert {k: v for k, v in fake_hub.files("alice/m").items() if k != ".gitattributes"} == MODEL_FILES
    assert fake_hub.history("alice/m")[0].title == "up"

    fake_hub.clear_requests()
    path = snapshot_download("alice/m", allow_patterns=WEIGHTS_AND_SIDE, ignore_patterns=["*/*"])
    wanted = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "README.md"}
    assert Path(path).name == info.oid
    assert _tree(path) == {k: MODEL_FILES[k] for k in wanted}
    assert sorted(fake_hub.downloaded("alice/m")) == sorted(wanted)  # optimizer.pt, original/ never fetched
    lfs = [r for r in fake_hub.requests if r.server == "cdn"]
    assert {r.file for r in lfs} == {"model.safetensors", "tokenizer.model"}  # LFS files come from the "CDN"...
    assert all(r.token is None for r in lfs)  # ...to which the client does not forward the token
    assert fake_hub.unexpected == []

    fake_hub.clear_requests()
    assert snapshot_download("alice/m", allow_patterns=WEIGHTS_AND_SIDE, ignore_patterns=["*/*"]) == path
    assert fake_hub.downloaded() == []  # all cached: only the revision is resolved again
    local = hf_hub_download("alice/m", "optimizer.pt", revision=info.oid)
    assert Path(local).read_bytes() == MODEL_FILES["optimizer.pt"]


def test_upload_deletions_and_unchanged_files(fake_hub: FakeHub, tmp_path: Path, upload_path: str) -> None:
    api = HfApi()
    first = fake_hub.add_repo("alice/m", {"a.txt": "a", "old/b.txt": "b", "keep.json": "{}"})
    folder = _folder(tmp_path / "up", {"a.txt": b"a", "c.txt": b"c"})
    info = api.upload_folder(folder_path=folder, repo_id="alice/m", delete_patterns=["old/*"], commit_message="m")
    assert fake_hub.history("alice/m")[0].parents == [first]
    assert set(fake_hub.files("alice/m")) == {".gitattributes", "a.txt", "c.txt", "keep.json"}
    api.delete_file("keep.json", repo_id="alice/m")
    assert "keep.json" not in fake_hub.files("alice/m")
    same = api.upload_folder(folder_path=folder, repo_id="alice/m", commit_message="again")  # nothing changed
    assert same.oid == fake_hub.resolve("alice/m") != info.oid


def test_snapshot_at_branch_commit_and_short_sha(fake_hub: FakeHub) -> None:
    api = HfApi()
    v1 = fake_hub.add_repo("alice/m", {"config.json": "1", "model.safetensors": b"w1"})
    v2 = fake_hub.commit("alice/m", {"config.json": "2", "model.safetensors": b"w2"}, message="v2")
    api.create_branch("alice/m", branch="step-100", revision=v1)
    api.create_branch("alice/m", branch="step-100", exist_ok=True)
    dev = api.upload_file(
        path_or_fileobj=b"w3", path_in_repo="model.safetensors", repo_id="alice/m", revision="step-100"
    )
    assert fake_hub.refs("alice/m") == {"refs/heads/main": v2, "refs/heads/step-100": dev.oid}
    assert [b.name for b in api.list_repo_refs("alice/m").branches] == ["main", "step-100"]

    def snap(revision: str | None) -> dict[str, bytes]:
        return _tree(snapshot_download("alice/m", revision=revision, allow_patterns=["config.json", "*.safetensors"]))

    assert snap(None) == {"config.json": b"2", "model.safetensors": b"w2"}
    assert snap("step-100") == {"config.json": b"1", "model.safetensors": b"w3"}
    assert snap(v1) == {"config.json": b"1", "model.safetensors": b"w1"}
    assert api.model_info("alice/m", revision=v1[:7]).sha == v1
    assert Path(snapshot_download("alice/m", revision=v1[:7], allow_patterns=["config.json"])).name == v1
    assert [c.commit_id for c in api.list_repo_commits("alice/m")] == [v2, v1, fake_hub.history("alice/m")[-1].oid]


def test_pull_requests(fake_hub: FakeHub, tmp_path: Path, upload_path: str) -> None:
    api = HfApi()
    main = fake_hub.add_repo("alice/m", {"config.json": "main", "model.safetensors": b"w"})
    folder = _folder(tmp_path / "up", {"config.json": b"proposed"})
    info = api.upload_folder(folder_path=folder, repo_id="alice/m", create_pr=True, commit_message="Propose")
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert info.pr_url == f"{fake_hub.url}/alice/m/discussions/1"
    assert fake_hub.resolve("alice/m") == main  # main untouched
    assert fake_hub.resolve("alice/m", "refs/pr/1") == info.oid
    assert _tree(snapshot_download("alice/m", revision="refs/pr/1")) == {
        ".gitattributes": fake_hub.files("alice/m")[".gitattributes"],
        "config.json": b"proposed",
        "model.safetensors": b"w",
    }
    assert api.model_info("alice/m", revision="refs/pr/1").sha == info.oid

    # create_commit(create_pr=True) always goes through ?create_pr=1, and bob (no member) may open one on a public repo
    op = CommitOperationAdd("README.md", CARD.encode())
    pr2 = api.create_commit("alice/m", [op], commit_message="Card", create_pr=True, token=BOB_TOKEN)
    assert pr2.pr_revision == "refs/pr/2"
    assert fake_hub.files("alice/m", "refs/pr/2")["README.md"] == CARD.encode()
    assert fake_hub.discussions("alice/m")[2].author == "bob"
    with pytest.raises(HfHubHTTPError) as exc:  # but bob may not push to main
        api.create_commit("alice/m", [CommitOperationAdd("x", b"x")], commit_message="x", token=BOB_TOKEN)
    assert exc.value.response.status_code == 403


# -- repo info, visibility, errors ----------------------------------------------------------------------------------


def test_model_info(fake_hub: FakeHub) -> None:
    sha = fake_hub.add_repo("alice/m", MODEL_FILES)
    info = HfApi().model_info("alice/m", files_metadata=True)
    assert info.id == "alice/m" and info.sha == sha and info.private is False
    assert info.card_data is not None and info.card_data.license == "apache-2.0"
    assert info.card_data.base_model == "meta-llama/Llama-3.1-8B"
    assert info.config == {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {".gitattributes", *MODEL_FILES}
    weights = siblings["model.safetensors"]
    assert weights.size == len(MODEL_FILES["model.safetensors"]) and weights.lfs is not None
    assert siblings["config.json"].lfs is None
    files = HfApi().list_repo_files("alice/m")
    assert sorted(files) == sorted([".gitattributes", *MODEL_FILES])


def test_private_repo_invisible_to_others(fake_hub: FakeHub) -> None:
    fake_hub.add_repo("alice/secret", {"config.json": "{}"}, private=True)
    fake_hub.add_repo("alice-lab/team-secret", {"config.json": "{}"}, private=True)
    api = HfApi()
    assert api.model_info("alice/secret").private is True
    assert api.model_info("alice-lab/team-secret", token=ALICE_READ_TOKEN).sha
    with pytest.raises(RepositoryNotFoundError) as exc:
        api.model_info("alice/secret", token=BOB_TOKEN)
    assert exc.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError) as exc:
        api.model_info("alice/secret", token=False)
    assert exc.value.response.status_code == 401  # anonymous: the Hub says 401, the client still says not found
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/secret", token=BOB_TOKEN)
    assert not api.repo_exists("alice-lab/team-secret", token=BOB_TOKEN)
    with pytest.raises(RepositoryNotFoundError):  # pushing to what one cannot see
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="alice/secret", token=BOB_TOKEN)


def test_not_found_errors(fake_hub: FakeHub) -> None:
    sha = fake_hub.add_repo("alice/m", {"config.json": "{}"})
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/nope")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/m", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("alice/m", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/m", "config.json", revision="refs/pr/9")
    with pytest.raises(EntryNotFoundError):  # RemoteEntryNotFoundError in 2.4
        hf_hub_download("alice/m", "missing.json")
    assert not api.file_exists("alice/m", "missing.json") and api.file_exists("alice/m", "config.json")
    assert api.revision_exists("alice/m", sha) and not api.revision_exists("alice/m", "0" * 40)
    with pytest.raises(HfHubHTTPError) as exc:  # not a route the fake knows: recorded for the test to see
        list(api.list_models(author="alice"))
    assert exc.value.response.status_code == 404
    assert [str(r) for r in fake_hub.unexpected] == ["GET /api/models"]


# -- offline ------------------------------------------------------------------------------------------------------


def test_offline_from_the_cache(fake_hub: FakeHub) -> None:
    fake_hub.add_repo("alice/m", MODEL_FILES)
    fake_hub.add_repo("alice/other", {"config.json": "{}"})
    online = snapshot_download("alice/m", allow_patterns=WEIGHTS_AND_SIDE, ignore_patterns=["*/*"])
    fake_hub.offline()
    assert constants.is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"
    fake_hub.clear_requests()
    assert snapshot_download("alice/m", allow_patterns=WEIGHTS_AND_SIDE, ignore_patterns=["*/*"]) == online
    assert Path(hf_hub_download("alice/m", "config.json")).read_bytes() == MODEL_FILES["config.json"]
    with pytest.raises(LocalEntryNotFoundError) as exc:  # never downloaded
        snapshot_download("alice/other")
    assert type(exc.value) is LocalEntryNotFoundError
    with pytest.raises(IncompleteSnapshotError):  # a LocalEntryNotFoundError: optimizer.pt was never fetched
        snapshot_download("alice/m")
    assert fake_hub.requests == []  # offline, nothing leaves the process
    fake_hub.offline(False)
    assert snapshot_download("alice/other")


# -- model cards ----------------------------------------------------------------------------------------------------


def test_model_card_validate(fake_hub: FakeHub) -> None:
    ModelCard(CARD).validate()
    ModelCard("---\nlicense: llama3.1\nbase_model: [a/b, c]\nlibrary_name: peft\npipeline_tag: text-generation\n---\n")
    with pytest.raises(ValueError, match='"license"'):
        ModelCard("---\nlicense: apache\n---\n# card\n").validate()
    with pytest.raises(ValueError, match='"base_model"'):
        ModelCard("---\nlicense: mit\nbase_model: not a repo id\n---\n").validate()
    with pytest.raises(ValueError, match='"pipeline_tag"'):
        ModelCard("---\npipeline_tag: magic\n---\n").validate()
    assert validate_metadata("# no metadata") == ([], ["empty or missing yaml metadata in repo card"])
    assert validate_metadata("---\n- a list\n---\n")[0] == ['"metadata" must be of type object']


def test_bad_card_refused_on_upload(fake_hub: FakeHub, tmp_path: Path, upload_path: str) -> None:
    fake_hub.add_repo("alice/m", {"config.json": "{}"})
    folder = _folder(tmp_path / "up", {"README.md": b"---\nlicense: apache\n---\n", "config.json": b"[]"})
    with pytest.raises(ValueError, match="license"):  # the client checks first (create_commit), else the Hub refuses
        HfApi().upload_folder(folder_path=folder, repo_id="alice/m")
    with pytest.raises(ValueError, match='"tags"'):  # ModelCard would normalise these tags; a raw README is sent as is
        HfApi().upload_file(path_or_fileobj=b"---\ntags: {a: 1}\n---\n", path_in_repo="README.md", repo_id="alice/m")
    assert fake_hub.files("alice/m")["config.json"] == b"{}"
    assert "README.md" not in fake_hub.files("alice/m")


# -- subprocesses ---------------------------------------------------------------------------------------------------


def test_subprocess_reaches_the_fake(fake_hub: FakeHub) -> None:
    sha = fake_hub.add_repo("alice/m", {"config.json": "{}", "model.safetensors": b"w"})
    code = (
        "import json, huggingface_hub as h;"
        "p = h.snapshot_download('alice/m', allow_patterns=['*.json']);"
        "print(json.dumps([h.constants.ENDPOINT, p, h.whoami()['name']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    endpoint, path, user = json.loads(out.stdout.strip().splitlines()[-1])
    assert endpoint == fake_hub.url and user == "alice"
    assert Path(path) == fake_hub.cache_dir / "models--alice--m" / "snapshots" / sha
    assert fake_hub.downloaded("alice/m") == ["config.json"]


def test_everything_is_undone(tmp_path: Path) -> None:
    from huggingface_hub import hf_api
    from huggingface_hub.utils import _http

    def state() -> tuple:
        env = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_TOKEN", "HF_HUB_OFFLINE")
        return (
            constants.ENDPOINT,
            constants.HUGGINGFACE_CO_URL_TEMPLATE,
            constants.HF_HUB_CACHE,
            constants.HF_TOKEN_PATH,
            constants.HF_HUB_OFFLINE,
            hf_api.api.endpoint,
            _http._HUB_ORIGINS,
            *(os.environ.get(k) for k in env),
        )

    before = state()
    with FakeHub() as hub, pytest.MonkeyPatch.context() as mp:
        use_fake_hub(hub, mp, tmp_path / "home")
        hub.offline()
        assert state() != before
        assert hub.url == constants.ENDPOINT == hf_api.api.endpoint
    assert state() == before
