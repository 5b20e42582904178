"""Run folders as trainers write them: analyze --run-dir, the base the run records, skipped and sharded step folders
(with the command that gathers the shards, run for real where it is installed), and re-grounding a TRL GRPO run
whose written checkpoints the trainer resumes from, down to the shell loop of docs/reground.md."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakehub import fake_hub_fixture  # noqa: F401
from helpers import assert_one_line_error, load_weights

from driftmerge.errors import InputError
from driftmerge.io.runbase import recorded_base
from driftmerge.io.rundirs import discover

TESTS = Path(__file__).parent
DOCS = TESTS.parent / "docs" / "reground.md"


def linked_run(runs, root: Path, steps=(100, 200, 300)) -> Path:
    """RUN/checkpoint-<step>/ as links to the session's planted llama checkpoints (read-only)."""
    root.mkdir(parents=True)
    for ck, step in zip(runs["llama"].checkpoints, steps, strict=True):
        (root / f"checkpoint-{step}").symlink_to(ck, target_is_directory=True)
    return root


def copied_run(runs, root: Path) -> Path:
    """RUN/checkpoint-100..300/ as copies (their files may be changed)."""
    for ck in runs["llama"].checkpoints:
        shutil.copytree(ck, root / ck.name)
    return root


def report(folder: Path) -> dict:
    out = json.loads((folder / "report.json").read_text())
    out.pop("refs", None)  # the paths the inputs were read from
    return out


# ---- analyze --run-dir -------------------------------------------------------------------------------------------
def test_analyze_from_a_run_dir_equals_listing_the_checkpoints(runs, tmp_path, cli):
    run = runs["llama"]
    root = linked_run(runs, tmp_path / "run")
    code, _, err = cli("analyze", run.base, "--run-dir", root, "--last", "2", "-o", tmp_path / "a")
    assert code == 0, err
    assert "took 2 of 3 checkpoints, steps 200, 300" in err
    assert cli("analyze", run.base, *run.checkpoints[1:], "-o", tmp_path / "b")[0] == 0
    a, b = report(tmp_path / "a"), report(tmp_path / "b")
    assert a["tensors"] == b["tensors"] and a["model"] == b["model"]
    code, _, err = cli("analyze", run.base, run.checkpoints[0], "--run-dir", root, "-o", tmp_path / "c")
    assert code == 2 and "not both" in err
    code, _, err = cli("analyze", run.base, "--every", "100", "-o", tmp_path / "c")
    assert code == 2 and "--run-dir" in err


# ---- the base the run records ------------------------------------------------------------------------------------
def test_base_from_a_checkpoint_config_name_or_path(runs, tmp_path, cli):
    """transformers before 5 saved ``_name_or_path``: a local folder there is taken as BASE."""
    run = runs["llama"]
    root = copied_run(runs, tmp_path / "run")
    for ck in root.iterdir():
        config = json.loads((ck / "config.json").read_text())
        (ck / "config.json").write_text(json.dumps({**config, "_name_or_path": str(run.base)}))
    code, _, err = cli("analyze", "--run-dir", root, "-o", tmp_path / "a")
    assert code == 0, err
    assert f"base {run.base}: recorded in checkpoint-100/config.json _name_or_path" in err
    assert cli("analyze", run.base, *sorted(root.iterdir()), "-o", tmp_path / "b")[0] == 0
    assert report(tmp_path / "a")["tensors"] == report(tmp_path / "b")["tensors"]


def test_base_recorded_by_peft_and_model_cards(tmp_path):
    """PEFT's adapter_config.json comes first, then RUN/README.md (TRL), then the checkpoint's card; a record that
    is neither a folder nor cached is named in the error."""
    from driftmerge.io.rundirs import Found

    run, ck = tmp_path / "run", tmp_path / "run" / "checkpoint-5"
    ck.mkdir(parents=True)
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    found = [Found(5, ck)]
    (ck / "README.md").write_text(f"---\nbase_model: {tmp_path / 'm2'}\nlibrary_name: peft\n---\n# card\n")
    assert recorded_base(run, found).where == "checkpoint-5/README.md base_model"
    (run / "README.md").write_text(f"---\nbase_model:\n- {tmp_path / 'm1'}\ntags:\n- trl\n---\n# card\n")
    assert recorded_base(run, found).ref == str(tmp_path / "m1")
    (ck / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "m2")}))
    got = recorded_base(run, found)
    assert (got.ref, got.where) == (str(tmp_path / "m2"), "checkpoint-5/adapter_config.json base_model_name_or_path")
    for f in ("adapter_config.json", "README.md"):
        (ck / f).unlink()
    (run / "README.md").write_text("---\nbase_model: nobody/not-cached\n---\n")
    with pytest.raises(InputError, match=r"records base nobody/not-cached \(README.md base_model\).*give BASE"):
        recorded_base(run, found)


def test_base_from_trl_model_card_in_the_offline_cache(runs, tmp_path, cli, fake_hub):
    """TRL's own card (``generate_model_card``, as its trainers write RUN/README.md) naming a Hub base that is in
    the cache: taken with HF_HUB_OFFLINE=1; the adapter equals the one extracted with BASE given."""
    from huggingface_hub import snapshot_download
    from trl.trainer.utils import generate_model_card

    run = runs["llama"]
    fake_hub.add_repo("alice/tiny-base", run.base)
    snapshot_download("alice/tiny-base")
    fake_hub.offline()
    root = linked_run(runs, tmp_path / "run")
    card = generate_model_card(base_model="alice/tiny-base", model_name="run", hub_model_id=None, dataset_name=None,
                               tags=[], wandb_url=None, trackio_url=None, trainer_name="GRPO")  # fmt: skip
    card.save(root / "README.md")
    code, _, err = cli("extract", "--run-dir", root, "-o", tmp_path / "a")
    assert code == 0, err
    assert "base alice/tiny-base: recorded in README.md base_model" in err
    assert cli("extract", run.base, *run.checkpoints, "-o", tmp_path / "b")[0] == 0
    assert load_weights(tmp_path / "a").keys() == load_weights(tmp_path / "b").keys()
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in b)


def test_no_recorded_base_is_one_error(runs, tmp_path, cli):
    root = linked_run(runs, tmp_path / "run")
    code, _, err = cli("extract", "--run-dir", root, "-o", tmp_path / "a")
    assert_one_line_error(code, err, 3, "records no base model", "give BASE")
    code, _, err = cli("extract", "-o", tmp_path / "a")
    assert code == 2 and "give BASE and at least one CHECKPOINT, or --run-dir" in err
    assert not (tmp_path / "a").exists()


# ---- skipped and sharded step folders ----------------------------------------------------------------------------
def test_a_step_folder_without_weights_is_named_once(runs, tmp_path, caplog):
    root = linked_run(runs, tmp_path / "run")
    (root / "checkpoint-400").mkdir()
    (root / "checkpoint-400" / "optimizer.pt").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="driftmerge"):
        found = discover(root)
    assert [f.step for f in found] == [100, 200, 300]
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint-400: no weights (optimizer-only or unfinished save); skipped"
    ]


def deepspeed_save(ck: Path) -> None:
    """What transformers' Trainer leaves with DeepSpeed ZeRO-3 when it does not gather the weights on save."""
    step = ck.name.split("-")[1]
    (ck / f"global_step{step}").mkdir(parents=True)
    for rank in (0, 1):
        (ck / f"global_step{step}" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"x")
        (ck / f"global_step{step}" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (ck / "latest").write_text(f"global_step{step}")
    (ck / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
    (ck / "trainer_state.json").write_text("{}")


def test_deepspeed_shards_only_name_the_gather_command(tmp_path, cli):
    root = tmp_path / "run"
    for step in (10, 20):
        deepspeed_save(root / f"checkpoint-{step}")
    code, _, err = cli("extract", "BASE", "--run-dir", root, "-o", tmp_path / "a")
    ck = root / "checkpoint-20"
    assert_one_line_error(
        code, err, 3, "2 checkpoint folders, none with Hugging Face weights", "checkpoint-10, checkpoint-20: ",
        "DeepSpeed ZeRO shards", f"`python {ck}/zero_to_fp32.py {ck} {ck} --safe_serialization`",
        "likewise for each",
    )  # fmt: skip
    assert "no checkpoint folders" not in err


def torch_dcp(folder: Path, state: dict, config: Path) -> None:
    """A real torch.distributed.checkpoint save (one process) of ``state``, the model's config beside it."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder))
    shutil.copy(config, folder.parent / "config.json" if folder.name.startswith("pytorch_model_fsdp") else folder)


def _gather(hint: str, cwd: Path) -> None:
    """Run the command a message names between backticks, as the user would."""
    command = re.search(r"`([^`]+)`", hint)
    assert command is not None, hint
    subprocess.run(command.group(1), shell=True, check=True, cwd=cwd, capture_output=True, timeout=300)


@pytest.mark.slow
def test_fsdp_and_dcp_saves_name_commands_that_really_gather_them(runs, tmp_path, cli):
    """accelerate's FSDP SHARDED_STATE_DICT layout and a plain torch DCP folder: the error names the command; run
    as given, it leaves a folder that extract takes, with the checkpoint's exact weights."""
    run = runs["llama"]
    weights = load_weights(run.checkpoints[-1])
    for layout in ("fsdp", "dcp"):
        root = tmp_path / layout
        if layout == "fsdp":
            ck = root / "checkpoint-300"
            torch_dcp(ck / "pytorch_model_fsdp_0", {"model": weights}, run.base / "config.json")
            torch_dcp(ck / "optimizer_0", {"optimizer": {"state": torch.zeros(2)}}, run.base / "config.json")
            want = ["FSDP sharded weights", f"`accelerate merge-weights {ck}/pytorch_model_fsdp_0 {ck}`"]
        else:
            ck = root / "step-300"  # torchtitan's name
            ck.mkdir(parents=True)
            torch_dcp(ck, weights, run.base / "config.json")
            want = ["a torch distributed checkpoint", f"dcp_to_torch {ck} {ck}/pytorch_model.bin`"]
        code, _, err = cli("extract", run.base, "--run-dir", root, "-o", tmp_path / f"{layout}-a")
        assert_one_line_error(code, err, 3, "1 checkpoint folder, none with Hugging Face weights", *want)
        _gather(err, tmp_path)
        code, _, err = cli("extract", run.base, "--run-dir", root, "-o", tmp_path / f"{layout}-a")
        assert code == 0, err
        got = load_weights(ck) if layout == "fsdp" else torch.load(ck / "pytorch_model.bin", weights_only=True)
        assert got.keys() == weights.keys() and all(torch.equal(got[n], weights[n]) for n in weights)


# ---- reground writes checkpoints the trainer resumes from --------------------------------------------------------
M, N, SAVE = 4, 4, 2  # window, jump, save_steps (optimizer steps)


def test_reground_checkpoint_resumes_a_grpo_trainer(tmp_path):
    """A real GRPOTrainer run saved at 2 and 4; reground writes checkpoint-8 (trainer state, optimizer kept or
    reset, scheduler moved on 4 steps, RNG); a new trainer resumes there with exactly those weights and runs 9..12."""
    sys.path.insert(0, str(TESTS))
    from grpo import make_grpo_trainer
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    from driftmerge.commands.reground_run import reground_run_dir

    run, base = tmp_path / "run", tmp_path / "base"
    trainer = make_grpo_trainer(run, max_steps=M, save_steps=SAVE)
    trainer.model.save_pretrained(base)
    trainer.train()
    end = run / f"checkpoint-{M}"
    (run / "checkpoint-5").mkdir()  # a save under way: named, skipped
    (run / "checkpoint-5" / "trainer_state.json").write_text("{}")
    for optimizer in ("reset", "keep"):  # keep last: the one resumed below
        out, said = tmp_path / f"jumps-{optimizer}", []
        done = reground_run_dir(run, every=M, jump=N, base=base, out=out, optimizer=optimizer, log=said.append)
        assert said[0] == "checkpoint-5: no weights (optimizer-only or unfinished save); skipped"
        assert [(w.start, w.end, w.output) for w in done] == [(0, M, M + N)]
        ck = Path(get_last_checkpoint(out))
        assert ck == out / f"checkpoint-{M + N}"
        state, was = (json.loads((c / "trainer_state.json").read_text()) for c in (ck, end))
        assert state["global_step"] == M + N and state["epoch"] == pytest.approx(was["epoch"] * (M + N) / M)
        assert state["log_history"] == was["log_history"]
        sched, sched_was = (torch.load(c / "scheduler.pt", weights_only=True) for c in (ck, end))
        assert sched["last_epoch"] == sched_was["last_epoch"] + N
        opt, opt_was = (torch.load(c / "optimizer.pt", weights_only=True) for c in (ck, end))
        assert opt["param_groups"] == opt_was["param_groups"]
        if optimizer == "keep":
            assert (ck / "optimizer.pt").read_bytes() == (end / "optimizer.pt").read_bytes()
        else:
            assert opt["state"] == {} and opt_was["state"]
        assert (ck / "rng_state.pth").read_bytes() == (end / "rng_state.pth").read_bytes()

    seen: dict[str, torch.Tensor] = {}

    class FirstWeights(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
            if not seen:
                seen.update({n: p.detach().clone() for n, p in model.state_dict().items()})

    shutil.rmtree(run / "checkpoint-5")
    resumed = make_grpo_trainer(run, max_steps=M + N + M, save_steps=SAVE, callbacks=[FirstWeights()])
    resumed.train(resume_from_checkpoint=get_last_checkpoint(out))
    jumped = load_weights(out / f"checkpoint-{M + N}")
    assert all(torch.equal(seen[n], jumped[n]) for n in jumped)
    assert resumed.state.global_step == M + N + M
    steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4, 9, 10, 11, 12]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12", "checkpoint-2",
                                                                 "checkpoint-4"]  # fmt: skip


TRAIN_PY = """\
# train.py STEPS: the tests' tiny GRPO run (tests/grpo.py) trained until global step STEPS, saving every 2 steps
# into run/; it resumes from the newest re-grounded checkpoint when there is one.
import os, sys
sys.path.insert(0, {tests!r})
from grpo import make_grpo_trainer
from transformers.trainer_utils import get_last_checkpoint

trainer = make_grpo_trainer("run", max_steps=int(sys.argv[1]), save_steps=2)
jumps = "run/driftmerge-reground"
trainer.train(resume_from_checkpoint=get_last_checkpoint(jumps) if os.path.isdir(jumps) else None)
"""


def documented_loop() -> str:
    """The shell loop docs/reground.md shows, exactly: the ```bash block after the line naming this test."""
    text = DOCS.read_text()
    m = re.search(r"tests/test_run_folders\.py.*?\n```bash\n(.*?)```", text, re.S)
    assert m is not None, "docs/reground.md lost its tested shell loop"
    return m.group(1)


@pytest.mark.slow
def test_the_documented_shell_loop_runs_three_windows(tmp_path):
    """docs/reground.md's loop, as written, with TRL's GRPOTrainer: train M steps, reground --once, resume from
    the written checkpoint, three times; each stage continues at the step the jump reached."""
    sys.path.insert(0, str(TESTS))
    from grpo import make_grpo_trainer

    make_grpo_trainer(tmp_path / "unused").model.save_pretrained(tmp_path / "base")  # the run's start (seed 0)
    (tmp_path / "train.py").write_text(TRAIN_PY.format(tests=str(TESTS)))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", documented_loop()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for w in (1, 2, 3):
        assert f"wrote checkpoint-{w * (M + N)}: window {(w - 1) * (M + N)}..{(w - 1) * (M + N) + M}" in done.stdout
    out = tmp_path / "run" / "driftmerge-reground"
    windows = json.loads((out / "reground.json").read_text())["windows"]
    assert [(w["start"], w["end"], w["output"]) for w in windows] == [(0, 4, 8), (8, 12, 16), (16, 20, 24)]
    last = json.loads((tmp_path / "run" / "checkpoint-28" / "trainer_state.json").read_text())
    assert last["global_step"] == 28
    assert [h["step"] for h in last["log_history"] if "loss" in h] == [*range(1, 5), *range(9, 13), *range(17, 21),
                                                                      *range(25, 29)]  # fmt: skip
