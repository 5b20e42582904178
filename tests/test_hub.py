"""Hub inputs, push and cards, against the fake Hub on 127.0.0.1 (tests/fakehub.py): never the network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fakehub import ALICE_READ_TOKEN, BOB_TOKEN, FakeHub, fake_hub_fixture  # noqa: F401
from helpers import assert_one_line_error, load_weights

BASE, RL = "alice-lab/tiny-base", "alice-lab/tiny-rl"
BASE_CARD = "---\nlicense: mit\nlibrary_name: transformers\n---\n\n# a tiny base\n"


@pytest.fixture
def hub_run(fake_hub: FakeHub, runs):
    """The planted llama run on the fake Hub: the base (with a card and files no one should fetch) in one repo, the
    checkpoints as branches step-100/200/300 of another."""
    run = runs["llama"]
    files = {p.name: p.read_bytes() for p in run.base.iterdir() if p.is_file()}
    files |= {"README.md": BASE_CARD, "onnx/model.safetensors": b"x", "training_args.bin": b"x", "optimizer.pt": b"x"}
    fake_hub.add_repo(BASE, files)
    fake_hub.add_repo(RL)
    for step, ck in zip(run.steps, run.checkpoints, strict=True):
        fake_hub.commit(RL, ck)
        fake_hub.create_branch(RL, f"step-{step}")
    fake_hub.clear_requests()
    return run


def _hub_refs(run) -> list[str]:
    return [BASE, *(f"{RL}@step-{s}" for s in run.steps)]


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


ADAPTER_WEIGHTS = ["adapter_model.safetensors", "drift_extras.safetensors"]


def test_extract_from_hub_ids_equals_local_and_records_commits(hub_run, fake_hub, cli, tmp_path):
    run = hub_run
    code, _, err = cli("extract", *_hub_refs(run), "-o", tmp_path / "hub")
    assert code == 0, err
    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "local")
    assert code == 0, err
    _same_files(tmp_path / "hub", tmp_path / "local", ADAPTER_WEIGHTS)

    meta = json.loads((tmp_path / "hub" / "driftmerge.json").read_text())
    assert meta["base"]["hub"] == {"repo_id": BASE, "revision": None, "commit": fake_hub.resolve(BASE)}
    assert meta["base"]["license"] == "mit"
    for ck, step in zip(meta["checkpoints"], run.steps, strict=True):
        rev = f"step-{step}"
        assert ck["step"] == step  # read from the revision name
        assert ck["hub"] == {"repo_id": RL, "revision": rev, "commit": fake_hub.resolve(RL, rev)}
    assert meta["steps_source"] == "folder names"
    config = json.loads((tmp_path / "hub" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE

    fetched = set(fake_hub.downloaded())
    assert {"model.safetensors", "config.json", "README.md"} <= fetched
    assert not fetched & {"onnx/model.safetensors", "training_args.bin", "optimizer.pt", ".gitattributes"}
    assert not fake_hub.unexpected


def test_safetensors_are_preferred_and_pickles_fetched_only_without_them(fake_hub, runs, tmp_path):
    from driftmerge.hub.refs import resolve

    base = runs["llama"].base
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    fake_hub.add_repo("alice/both", {**files, "pytorch_model.bin": b"pickle"})
    fake_hub.add_repo("alice/old", {"config.json": files["config.json"], "pytorch_model.bin": b"pickle"})
    resolve("alice/both")
    assert "pytorch_model.bin" not in fake_hub.downloaded("alice/both")
    got = resolve("alice/old")
    assert (got.path / "pytorch_model.bin").read_bytes() == b"pickle"


def test_offline_uses_the_cache_and_names_what_is_missing(hub_run, fake_hub, cli, tmp_path):
    run = hub_run
    assert cli("extract", *_hub_refs(run), "-o", tmp_path / "online")[0] == 0
    fake_hub.offline()
    fake_hub.clear_requests()
    code, _, err = cli("extract", *_hub_refs(run), "-o", tmp_path / "offline")
    assert code == 0, err
    assert fake_hub.requests == []  # nothing asked of the Hub
    _same_files(tmp_path / "online", tmp_path / "offline", ADAPTER_WEIGHTS)

    code, _, err = cli("extract", BASE, f"{RL}@step-999", "-o", tmp_path / "never")
    assert_one_line_error(code, err, 3, f"{RL}@step-999", "not in the local Hugging Face cache", "HF_HUB_OFFLINE")
    assert not (tmp_path / "never").exists()


def test_unknown_repo_revision_and_private_repo_give_one_line(hub_run, fake_hub, cli, tmp_path, monkeypatch):
    fake_hub.add_repo("bob/secret", {"config.json": "{}"}, private=True)
    code, _, err = cli("extract", "alice-lab/nope", f"{RL}@step-100", "-o", tmp_path / "x")
    assert_one_line_error(code, err, 3, "alice-lab/nope", "no such local folder", "no Hub repo")
    code, _, err = cli("extract", BASE, f"{RL}@no-such-branch", "-o", tmp_path / "x")
    assert_one_line_error(code, err, 3, "has no revision 'no-such-branch'")
    code, _, err = cli("extract", "bob/secret", f"{RL}@step-100", "-o", tmp_path / "x")
    assert_one_line_error(code, err, 3, "bob/secret", "this token can see", "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", BOB_TOKEN)  # bob sees it (and it holds no weights)
    code, _, err = cli("extract", "bob/secret", f"{RL}@step-100", "-o", tmp_path / "x")
    assert_one_line_error(code, err, 3, "no model weights")
    assert not (tmp_path / "x").exists()


def test_apply_fetches_the_recorded_base_at_its_commit(hub_run, fake_hub, cli, tmp_path):
    run = hub_run
    assert cli("extract", *_hub_refs(run), "-o", tmp_path / "adapter")[0] == 0
    assert cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "local")[0] == 0
    fake_hub.commit(BASE, {"model.safetensors": (run.checkpoints[0] / "model.safetensors").read_bytes()})
    shutil.rmtree(fake_hub.cache_dir)  # the cached base is gone, and main has moved on
    code, _, err = cli("apply", tmp_path / "adapter", "--scale", "1.5", "-o", tmp_path / "model")
    assert code == 0, err
    assert cli("apply", tmp_path / "local", "--scale", "1.5", "-o", tmp_path / "model-local")[0] == 0
    _same_files(tmp_path / "model", tmp_path / "model-local", ["model.safetensors"])
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"base_model: {BASE}" in card and "license: mit" in card


def _card_data(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def test_push_adapter_then_apply_it_from_the_hub(hub_run, fake_hub, cli, tmp_path):
    from huggingface_hub import ModelCard

    run = hub_run
    adapter = tmp_path / "adapter"
    assert cli("extract", *_hub_refs(run), "-o", adapter)[0] == 0
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    code, out, err = cli("push", adapter, "alice/tiny-drift")
    assert code == 0, err
    assert "pushed adapter" in out and fake_hub.resolve("alice/tiny-drift") in out
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before  # the folder is not changed
    files = fake_hub.files("alice/tiny-drift")
    for name in ("adapter_config.json", *ADAPTER_WEIGHTS, "driftmerge.json"):
        assert files[name] == before[name]
    card = files["README.md"].decode()
    data = _card_data(card)
    assert data["base_model"] == BASE and data["license"] == "mit" and data["library_name"] == "peft"
    assert "driftmerge" in data["tags"]
    for fact in (
        "steps 100, 200, 300",
        "rank 1",
        "drift energy kept by the factors",
        "median R²",
        "driftmerge extract",
    ):
        assert fact in card, fact
    ModelCard(card).validate()  # the fake Hub's metadata rules (license list, base_model id, tags)

    # a second push of the same kind of folder is an update, not a name clash
    assert cli("push", adapter, "alice/tiny-drift")[0] == 0
    # the adapter as a Hub id: apply fetches it, and its base through the recorded reference
    code, _, err = cli("apply", "alice/tiny-drift", "--scale", "1.5", "-o", tmp_path / "model")
    assert code == 0, err
    assert cli("apply", adapter, "--scale", "1.5", "-o", tmp_path / "model-local")[0] == 0
    _same_files(tmp_path / "model", tmp_path / "model-local", ["model.safetensors"])


def test_push_to_a_branch_and_as_a_pull_request(runs, fake_hub, cli, tmp_path):
    run = runs["llama"]
    adapter = tmp_path / "adapter"
    assert cli("extract", run.base, *run.checkpoints, "-o", adapter)[0] == 0
    assert cli("push", adapter, "alice/d", "--revision", "exp")[0] == 0
    assert "adapter_model.safetensors" in fake_hub.files("alice/d", "exp")
    assert "adapter_model.safetensors" not in fake_hub.files("alice/d")
    code, out, err = cli("push", adapter, "alice/d", "--create-pr")
    assert code == 0, err
    assert "refs/pr/1" in fake_hub.refs("alice/d") and "discussions/1" in out
    assert "adapter_model.safetensors" not in fake_hub.files("alice/d")  # main untouched until merged


def test_push_refusals_are_one_line_and_leave_nothing(runs, fake_hub, cli, tmp_path, monkeypatch):
    run = runs["llama"]
    adapter = tmp_path / "adapter"
    assert cli("extract", run.base, *run.checkpoints, "-o", adapter)[0] == 0
    fake_hub.add_repo("alice/taken", {"model.bin": b"someone's model"})
    code, _, err = cli("push", adapter, "alice/taken")
    assert_one_line_error(code, err, 4, "alice/taken", "name is taken", "--create-pr")
    assert set(fake_hub.files("alice/taken")) == {".gitattributes", "model.bin"}
    assert cli("push", adapter, "alice/taken", "--create-pr")[0] == 0  # a PR to it is fine

    code, _, err = cli("push", adapter, "bob/x")
    assert_one_line_error(code, err, 4, "bob/x", "no write access")
    monkeypatch.setenv("HF_TOKEN", ALICE_READ_TOKEN)
    code, _, err = cli("push", adapter, "alice/y")
    assert_one_line_error(code, err, 4, "alice/y", "no write access")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    code, _, err = cli("push", adapter, "alice/y")
    assert_one_line_error(code, err, 4, "alice/y", "rejected the token")
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = cli("push", adapter, "alice/y")
    assert_one_line_error(code, err, 4, "alice/y", "no Hugging Face token", "hf auth login")
    assert not fake_hub.repo_exists("alice/y") and not fake_hub.repo_exists("bob/x")

    # --push-to-hub without a token fails before the long work, writing nothing
    code, _, err = cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "a2", "--push-to-hub", "alice/z")
    assert_one_line_error(code, err, 4, "no Hugging Face token")
    assert not (tmp_path / "a2").exists()
    code, _, err = cli("push", tmp_path, "alice/z")
    assert_one_line_error(code, err, 3, "neither an adapter", "nor a model folder")
    code, _, err = cli("push", adapter, "not//an/id")
    assert_one_line_error(code, err, 3, "not a Hub repo id")


def test_dry_run_contacts_nobody(runs, fake_hub, cli, tmp_path):
    run = runs["llama"]
    adapter = tmp_path / "adapter"
    assert cli("extract", run.base, *run.checkpoints, "-o", adapter)[0] == 0
    fake_hub.clear_requests()
    code, out, err = cli("push", adapter, "alice/d", "--dry-run")
    assert code == 0, err
    assert fake_hub.requests == [] and not fake_hub.repo_exists("alice/d")
    assert "would push adapter" in out and "adapter_model.safetensors" in out and "library_name: peft" in out


def test_push_to_hub_on_extract_and_apply_with_analysis(hub_run, fake_hub, cli, tmp_path):
    pytest.importorskip("matplotlib")
    from huggingface_hub import ModelCard

    run = hub_run
    adapter = tmp_path / "adapter"
    code, out, err = cli("extract", *_hub_refs(run), "-o", adapter, "--push-to-hub", "alice/drift", "--hub-private")
    assert code == 0, err
    assert "pushed adapter" in out
    assert "adapter_model.safetensors" in fake_hub.files("alice/drift")

    assert cli("analyze", run.base, *run.checkpoints, "-o", tmp_path / "analysis")[0] == 0
    assert cli("push", adapter, "alice/drift", "--analysis", tmp_path / "analysis")[0] == 0
    files = fake_hub.files("alice/drift")
    figures = sorted(p.name for p in (tmp_path / "analysis").glob("*.png"))
    assert figures and all(f"analysis/{f}" in files for f in figures)
    card = files["README.md"].decode()
    assert "## Analysis" in card and all(f"(analysis/{f})" in card for f in figures)
    ModelCard(card).validate()

    code, out, err = cli("apply", adapter, "--scale", "1.25", "-o", tmp_path / "m", "--push-to-hub", "alice/m")
    assert code == 0, err
    files = fake_hub.files("alice/m")
    assert "model.safetensors" in files and "config.json" in files
    data = _card_data(files["README.md"].decode())
    assert data["base_model"] == BASE and data["license"] == "mit" and "extrapolation" in data["tags"]
    assert "scale: **1.25**" in files["README.md"].decode()
    assert load_weights(tmp_path / "m")  # the local folder stays complete


def test_a_recipe_with_hub_inputs_and_a_push(hub_run, fake_hub, cli, tmp_path, monkeypatch):
    run = hub_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        f"extract:\n  base: {BASE}\n  checkpoints: [{RL}@step-100, {RL}@step-200, {RL}@step-300]\n  output: drift\n"
        "apply:\n  scale: 1.5\n  output: model\npush:\n  repo_id: alice/x1.5\n  private: true\n"
    )
    code, out, err = cli("run", "r.yaml")
    assert code == 0, err
    assert "pushed model" in out
    files = fake_hub.files("alice/x1.5")
    assert files["model.safetensors"] == (tmp_path / "model" / "model.safetensors").read_bytes()
    assert cli("extract", run.base, *run.checkpoints, "-o", "local")[0] == 0
    assert cli("apply", "local", "--scale", "1.5", "-o", "local-model")[0] == 0
    _same_files(tmp_path / "model", tmp_path / "local-model", ["model.safetensors"])
