"""``driftmerge.json`` as a typed model: same bytes out as in, older version 1 files read, one-line errors."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from helpers import assert_one_line_error
from synthetic import make_run

from driftmerge.commands.extract import extract
from driftmerge.errors import InputError
from driftmerge.io.adapter import read_adapter
from driftmerge.schema import FORMAT_VERSION, parse_meta


def _rec(shape, kind, norm, r2, stored, module=None, rank=None, energy=None, **placement) -> dict:
    """A per-tensor record in extract's key order (``module`` only for LoRA-able tensors; ``placement``: the
    expert-stack fields, present only when set)."""
    rec = {"shape": shape, "kind": kind, "drift_norm": norm, "r2": r2, "stored": stored}
    return {**rec, **({"module": module} if module else {}), "rank": rank, "energy": energy, **placement}


HUB = {"repo_id": "org/base", "revision": None, "commit": "0123456789abcdef0123"}
META = {
    "format_version": 1,
    "driftmerge_version": "0.1.0",
    "base": {"ref": "/b", "step": 0, "signature": "s", "probe": "p", "license": "mit", "hub": HUB},
    "checkpoints": [{"ref": "/c1", "step": 100}, {"ref": "/c2", "step": 200, "hub": {**HUB, "revision": "main"}}],
    "steps_source": "folder names",
    "base_step": 0,
    "s_ref": 200,
    "fit": "lsq",
    "rank_rule": 0.9,
    "svd": "randomized",
    "seed": 0,
    "niter": 2,
    "oversample": 8,
    "max_memory": 1073741824,
    "device": "cpu",
    "factor_dtype": "float32",
    "storage_dtype": "bfloat16",
    "adapter_dtype": "float32",
    "include": None,
    "exclude": "lm_head",
    "architecture_source": "known",
    "fan_in_fan_out": False,
    "tied": {"lm_head.weight": "embed.weight"},
    "command": "driftmerge extract /b /c1 /c2",
    "tensors": {
        "a.q.weight": _rec([4, 4], "linear", 0.5, 0.97, "lora", module="a.q", rank=2, energy=0.91),
        "a.k.weight": _rec([4, 4], "linear", 1e-30, None, "zero", module="a.k"),  # LoRA-able, drift below round-off
        "a.norm.weight": _rec([4], "other", 0.0, None, "zero"),
        "a.bias": _rec([4], "other", 0.25, 1.0, "extras", energy=1.0),
        "e.experts.1.w3.weight": _rec(
            [2, 4],
            "experts",
            0.1,
            0.99,
            "lora",
            "e.experts.gate_up_proj",
            1,
            0.8,
            experts=2,
            expert=1,
            rows=[2, 4],
            nest=1,
        ),
    },
    "summary": {
        "tensors": 4,
        "lora_tensors": 1,
        "extras_tensors": 1,
        "extras_kinds": {"bias": 1},
        "zero_tensors": ["a.k.weight", "a.norm.weight"],
        "rank_min": 2,
        "rank_max": 2,
        "energy_kept": 0.91,
        "extras_share": 0.2,
        "median_r2": 0.985,
        "checkpoint_bytes": 1000,
        "base_bytes": 1000,
    },
    "scale": 1.5,
    "scaled_from": "/adapter",
}


def test_every_key_comes_back_in_its_place():
    text = json.dumps(META, indent=2) + "\n"
    meta = parse_meta(json.loads(text), "driftmerge.json")
    assert meta.to_json() == text
    assert meta.base.hub == HUB and meta.checkpoints[0].hub is None and meta.tensors["a.bias"].module is None
    unscaled = {k: v for k, v in META.items() if k not in ("scale", "scaled_from")}
    assert parse_meta(unscaled, "x").to_json() == json.dumps(unscaled, indent=2) + "\n"


def test_version_1_files_from_before_a_key_existed_still_read():
    early = copy.deepcopy(META)
    del early["max_memory"], early["base"]["signature"], early["base"]["probe"], early["base"]["license"]
    del early["tensors"]["a.bias"]["r2"]
    meta = parse_meta(early, "x")
    assert meta.max_memory is None and meta.base.signature is None and meta.tensors["a.bias"].r2 is None


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), ["format_version 2 is newer", "upgrade driftmerge"]),
        (lambda m: m.update(format_version="1"), ["unsupported format_version '1'"]),
        (lambda m: m.pop("format_version"), ["unsupported format_version None"]),
        (lambda m: m["tensors"]["a.q.weight"].pop("shape"), ['tensors["a.q.weight"].shape: field required']),
        (lambda m: m["checkpoints"][1].update(step="late"), ["checkpoints[1].step: input should be a valid integer"]),
        (lambda m: m["summary"].update(rank_min=True), ["summary.rank_min: input should be a valid integer"]),
        (lambda m: m.update(notes="mine"), ["notes: extra inputs are not permitted"]),
        (lambda m: m["tensors"]["a.q.weight"].pop("module"), ['tensors["a.q.weight"]: value error, a tensor stored']),
        (lambda m: m["tensors"]["a.bias"].update(stored="disk"), ['tensors["a.bias"].stored: input should be']),
    ],
)
def test_a_bad_file_is_one_line_naming_file_and_key(change, fragments):
    bad = copy.deepcopy(META)
    change(bad)
    with pytest.raises(InputError) as info:
        parse_meta(bad, "/x/driftmerge.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("/x/driftmerge.json: ")
    for f in fragments:
        assert f in message, (f, message)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schema")
    run = make_run(tmp / "run", arch="llama", steps=(100, 200))
    return extract(run.base, run.checkpoints, out_dir=tmp / "adapter").out_dir


def test_read_adapter_gives_the_model_and_apply_names_a_bad_key(adapter, tmp_path, cli):
    meta = read_adapter(adapter).meta
    assert meta.format_version == FORMAT_VERSION and meta.summary.lora_tensors > 0
    assert meta.to_json() == (adapter / "driftmerge.json").read_text()
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    raw = json.loads((broken / "driftmerge.json").read_text())
    raw["s_ref"] = "last"
    (broken / "driftmerge.json").write_text(json.dumps(raw))
    code, _, err = cli("apply", broken, "--scale", "1", "-o", tmp_path / "out")
    assert_one_line_error(code, err, 3, str(broken / "driftmerge.json"), "s_ref: input should be a valid integer")
