"""Model cards and the base's Hub id: ``base_model`` from the Hugging Face cache or ``--base-model``, never a local
path in a card or ``adapter_config.json``, a usage that names the folder or repo, no dead link. The cache is laid out
by hand in a temporary ``HF_HUB_CACHE`` as huggingface_hub lays it out; pushes go to the in-process fake Hub
(tests/fakehub.py): never the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from fakehub import FakeHub, fake_hub_fixture  # noqa: F401
from helpers import assert_one_line_error, load_weights

BASE_ID = "alice-lab/tiny-base"
SHA = "0123456789abcdef0123456789abcdef01234567"
OLD_SHA = "89abcdef0123456789abcdef0123456789abcdef"


def cache_snapshot(
    cache: Path, repo_id: str, source: Path, commit: str = SHA, refs: tuple[str, ...] = ("main",)
) -> Path:
    """``source``'s files as huggingface_hub caches a model repo: ``models--org--name/blobs/<hash>`` holding the
    bytes, ``snapshots/<commit>/<file>`` relative links to them, ``refs/<ref>`` holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        if f.is_file():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``HF_HUB_CACHE`` of this test (huggingface_hub read the variable at import: its constant too)."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    return cache


def no_local_path(text: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nothing of this machine's file system in ``text``: every test folder lies under the base temp folder."""
    assert str(tmp_path_factory.getbasetemp()) not in text, text
    assert str(Path.home()) not in text, text


def card_facts(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def check_card(text: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The promises every card keeps; returns its YAML data."""
    no_local_path(text, tmp_path_factory)
    assert "{this folder or repo}" not in text
    assert "pypi.org" not in text and "](http" not in text  # no link to a page the project does not have
    return card_facts(text)


# ---- the cache lookup -----------------------------------------------------------------------------------------
def test_cache_origin_finds_the_repo_and_commit_of_a_cached_snapshot(runs, hf_cache, tmp_path):
    from driftmerge.hub.refs import cache_origin

    base = runs["llama"].base
    snap = cache_snapshot(hf_cache, BASE_ID, base)
    assert cache_origin(snap) == {"repo_id": BASE_ID, "revision": None, "commit": SHA}
    assert cache_origin(str(snap) + "/") == cache_origin(snap)
    (tmp_path / "link").symlink_to(snap)  # a link to the snapshot is the snapshot
    assert cache_origin(tmp_path / "link") == cache_origin(snap)

    tagged = cache_snapshot(hf_cache, BASE_ID, base, commit=OLD_SHA, refs=("step-100",))
    assert cache_origin(tagged) == {"repo_id": BASE_ID, "revision": "step-100", "commit": OLD_SHA}
    detached = cache_snapshot(hf_cache, "org/other", base, commit=OLD_SHA, refs=())  # fetched by commit
    assert cache_origin(detached) == {"repo_id": "org/other", "revision": OLD_SHA, "commit": OLD_SHA}

    assert cache_origin(base) is None  # a folder outside any cache
    assert cache_origin(tmp_path / "missing") is None
    assert cache_origin(snap.parent) is None and cache_origin(snap.parent.parent) is None  # not a snapshot
    dataset = cache_snapshot(hf_cache, "org/data", base).parent.parent.rename(hf_cache / "datasets--org--data")
    assert cache_origin(dataset / "snapshots" / SHA) is None  # a dataset's snapshot is no model


# ---- extract --------------------------------------------------------------------------------------------------
def test_extract_from_a_cached_base_names_its_hub_id(runs, hf_cache, tmp_path, tmp_path_factory):
    from driftmerge import extract

    run = runs["llama"]
    snap = cache_snapshot(hf_cache, BASE_ID, run.base)
    out = extract(snap, run.checkpoints, out_dir=tmp_path / "adapter").out_dir

    meta = json.loads((out / "driftmerge.json").read_text())
    assert meta["base"]["ref"] == str(snap.absolute())  # driftmerge itself keeps the local path
    assert meta["base"]["hub"] == {"repo_id": BASE_ID, "revision": None, "commit": SHA}
    config_text = (out / "adapter_config.json").read_text()
    assert json.loads(config_text)["base_model_name_or_path"] == BASE_ID
    no_local_path(config_text, tmp_path_factory)
    card = (out / "README.md").read_text()
    assert check_card(card, tmp_path_factory)["base_model"] == BASE_ID
    assert f"`{BASE_ID}@{SHA[:12]}`" in card and f"# base_model: {BASE_ID}" in card


def test_extract_from_a_local_base_names_no_path(runs, cli, tmp_path, tmp_path_factory):
    run = runs["llama"]
    adapter = tmp_path / "adapter"
    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", adapter)  # absolute paths in the command
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None  # PEFT's own "unknown"; a path would not travel
    card = (adapter / "README.md").read_text()
    assert "base_model" not in check_card(card, tmp_path_factory)
    assert "the local folder `base`" in card and "--base BASE_FOLDER" in card and "--base-model" in card
    assert f"driftmerge extract base {run.checkpoints[0].name}" in card  # the command, paths cut to their names
    meta = json.loads((adapter / "driftmerge.json").read_text())
    assert meta["base"]["ref"] == str(run.base.absolute()) and "hub" not in meta["base"]

    # apply finds the base through driftmerge.json, not adapter_config.json
    code, _, err = cli("apply", adapter, "--scale", "1.5", "-o", tmp_path / "model")
    assert code == 0, err
    assert load_weights(tmp_path / "model")
    model_card = (tmp_path / "model" / "README.md").read_text()
    assert "base_model" not in check_card(model_card, tmp_path_factory)
    assert "the drift adapter `adapter`" in model_card


def test_base_model_on_extract(runs, cli, tmp_path, tmp_path_factory):
    run = runs["llama"]
    adapter = tmp_path / "adapter"
    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", adapter, "--base-model", BASE_ID)
    assert code == 0, err
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    meta = json.loads((adapter / "driftmerge.json").read_text())
    assert meta["base"]["repo_id"] == BASE_ID and meta["base"]["ref"] == str(run.base.absolute())
    card = (adapter / "README.md").read_text()
    assert check_card(card, tmp_path_factory)["base_model"] == BASE_ID
    assert f"- base: `{BASE_ID}`, from the local folder `base` (step 0)" in card and "--base BASE_FOLDER" not in card

    # the model apply writes from it names the base too
    code, _, err = cli("apply", adapter, "--scale", "2", "-o", tmp_path / "model")
    assert code == 0, err
    assert check_card((tmp_path / "model" / "README.md").read_text(), tmp_path_factory)["base_model"] == BASE_ID

    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "x", "--base-model", str(run.base))
    assert_one_line_error(code, err, 3, "--base-model", "must be a Hub repo id")
    assert not (tmp_path / "x").exists()


def test_base_model_in_a_recipe_extract_stage():
    from driftmerge.commands.flags import flag_args
    from driftmerge.commands.options import ExtractOptions
    from driftmerge.commands.recipe_schema import ExtractStage

    stage = ExtractStage.model_validate({"base": "b", "checkpoints": ["c"], "base_model": BASE_ID})
    assert stage.base_model == BASE_ID
    assert flag_args(stage, ExtractOptions) == ["--base-model", BASE_ID]
    with pytest.raises(ValueError, match="must be a Hub repo id"):
        ExtractStage.model_validate({"base": "b", "checkpoints": ["c"], "base_model": "/not/an/id"})


def test_card_helpers():
    from driftmerge.hub.cards import portable_command

    cmd = "driftmerge extract /home/me/base /home/me/run/checkpoint-100 -o out --include=/x/y 'a b'"
    assert portable_command(cmd) == "driftmerge extract base checkpoint-100 -o out --include=y 'a b'"
    assert portable_command("driftmerge push / alice/x") == "driftmerge push / alice/x"


# ---- push -----------------------------------------------------------------------------------------------------
def test_push_with_base_model_names_it_in_card_and_config(runs, fake_hub: FakeHub, cli, tmp_path, tmp_path_factory):
    from huggingface_hub import ModelCard

    run = runs["llama"]
    adapter = tmp_path / "adapter"
    assert cli("extract", run.base, *run.checkpoints, "-o", adapter)[0] == 0
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}

    code, out, err = cli("push", adapter, "alice/drift", "--base-model", BASE_ID, "--dry-run")
    assert code == 0, err
    assert "adapter_config.json (base_model_name_or_path set)" in out and f"base_model: {BASE_ID}" in out

    code, _, err = cli("push", adapter, "alice/drift", "--base-model", BASE_ID)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before  # the folder is not changed
    files = fake_hub.files("alice/drift")
    config = json.loads(files["adapter_config.json"])
    assert config == {**json.loads(before["adapter_config.json"]), "base_model_name_or_path": BASE_ID}
    card = files["README.md"].decode()
    assert check_card(card, tmp_path_factory)["base_model"] == BASE_ID
    assert "driftmerge apply alice/drift --scale" in card and 'from_pretrained(base_model, "alice/drift")' in card
    ModelCard(card).validate()  # the fake Hub's metadata rules (base_model must be a repo id)

    # without --base-model: no base named, no local path sent, and the card still valid
    assert cli("push", adapter, "alice/drift2")[0] == 0
    files = fake_hub.files("alice/drift2")
    assert files["adapter_config.json"] == before["adapter_config.json"]
    card = files["README.md"].decode()
    assert "base_model" not in check_card(card, tmp_path_factory)
    ModelCard(card).validate()

    code, _, err = cli("push", adapter, "alice/drift3", "--base-model", "not//an/id")
    assert_one_line_error(code, err, 3, "not a Hub repo id")


def test_push_finds_a_cached_base_and_keeps_an_edited_card(runs, fake_hub, cli, tmp_path, tmp_path_factory):
    from huggingface_hub import ModelCard

    run = runs["llama"]
    snap = cache_snapshot(fake_hub.cache_dir, BASE_ID, run.base)  # the fake Hub's HF_HUB_CACHE
    adapter = tmp_path / "adapter"
    assert cli("extract", snap, *run.checkpoints, "-o", adapter, "--push-to-hub", "alice/d")[0] == 0
    files = fake_hub.files("alice/d")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BASE_ID
    card = files["README.md"].decode()
    assert check_card(card, tmp_path_factory)["base_model"] == BASE_ID and "driftmerge apply alice/d " in card
    ModelCard(card).validate()

    # an adapter from an earlier driftmerge: its config names the base's path, its card has the placeholder
    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(snap)}))
    (old / "README.md").write_text("# old card\n\n```\ndriftmerge apply {this folder or repo} --scale 1.5\n```\n")
    assert cli("push", old, "alice/old")[0] == 0
    files = fake_hub.files("alice/old")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BASE_ID
    assert check_card(files["README.md"].decode(), tmp_path_factory)["base_model"] == BASE_ID  # rebuilt

    # a card the user edited is theirs: only its base_model is set
    (old / "README.md").write_text("---\nlicense: mit\n---\n\n# my drift\n\nMy own words.\n")
    assert cli("push", old, "alice/old", "--base-model", "alice-lab/other")[0] == 0
    card = fake_hub.files("alice/old")["README.md"].decode()
    assert "My own words." in card and card_facts(card) == {"license": "mit", "base_model": "alice-lab/other"}


def test_push_a_model_with_base_model(runs, fake_hub, cli, tmp_path, tmp_path_factory):
    from huggingface_hub import ModelCard

    run = runs["llama"]
    assert cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "adapter")[0] == 0
    assert cli("apply", tmp_path / "adapter", "--scale", "1.5", "-o", tmp_path / "model")[0] == 0
    code, _, err = cli("push", tmp_path / "model", "alice/m", "--base-model", BASE_ID)
    assert code == 0, err
    files = fake_hub.files("alice/m")
    card = files["README.md"].decode()
    assert check_card(card, tmp_path_factory)["base_model"] == BASE_ID and "scale: **1.5**" in card
    assert files["config.json"] == (tmp_path / "model" / "config.json").read_bytes()
    ModelCard(card).validate()


def test_render_is_what_model_card_gives():
    # render() writes the front matter with ModelCardData alone (the full Hub client costs a quarter second at
    # start-up); huggingface_hub's ModelCard must read it and give the same text back
    from huggingface_hub import ModelCard

    from driftmerge.hub.cards import render

    data = {"base_model": "org/base", "license": "apache-2.0", "library_name": "peft", "tags": ["driftmerge", "x"]}
    text = render(data, "# Title\n\nBody with `code`.\n")
    card = ModelCard(text)
    assert str(card) == text
    assert card.data.to_dict() == data
    assert render({**data, "license": None}, "b").count("license") == 0
