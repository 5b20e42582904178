"""sweep (in-place scaling, rewards, report) and generate (logit extrapolation), on tiny models with a tokenizer."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import assert_one_line_error, load_weights
from synthetic import make_run

from driftmerge.commands.apply import apply_drift
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.evaluation.addition import char_tokenizer
from driftmerge.evaluation.generation import LogitExtrapolation, SamplingOptions, generate
from driftmerge.evaluation.inplace import DriftedModel
from driftmerge.evaluation.rewards import boxed, exact_number, last_boxed, last_number, load_reward
from driftmerge.io.models import load_causal_lm, load_tokenizer

PROMPTS = ["1+2=", "13+4=", "7+70=", "2+2+2="]  # different lengths: batches are left-padded
GREEDY = SamplingOptions(max_new_tokens=6)


@pytest.fixture(scope="module")
def drift(tmp_path_factory):
    """A llama run whose drift is large enough to change what the model writes, with a character tokenizer."""
    root = tmp_path_factory.mktemp("sweep")
    run = make_run(root / "run", noise=0.02, drift_rms=0.05, seed=3)
    for folder in (run.base, *run.checkpoints):
        char_tokenizer(folder)
    adapter = root / "adapter"
    extract(run.base, run.checkpoints, out_dir=adapter, options=ExtractOptions(rank=2))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": str(eval(p[:-1]))}) + "\n" for p in PROMPTS))
    return run, adapter, prompts


# ---- rewards --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [("The answer is 42.", 42.0), ("so -1,234.50 it is", -1234.5), ("x = 3/4", 0.75), ("12 then 7", 7.0),
     ("1e-3", 0.001), ("####  18", 18.0), ("no number here", None)],
)  # fmt: skip
def test_last_number(text, want):
    assert last_number(text) == want


def test_built_in_rewards():
    assert exact_number("", "so the total is $1,000.", "1000") == 1.0
    assert exact_number("", "3.50", "3.5") == 1.0 and exact_number("", "4", "3.5") == 0.0
    assert exact_number("", "nothing", "3") == 0.0
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert boxed("", r"\boxed{\frac{1}{2}}", "0.5") == 1.0
    assert boxed("", r"\boxed{ x + 1 }", "x+1") == 1.0 and boxed("", r"\boxed{x}", "y") == 0.0
    assert boxed("", r"\boxed{unclosed", "1") == 0.0 and boxed("", "no box 5", "5") == 0.0


def test_custom_reward_from_a_file_and_errors(tmp_path):
    (tmp_path / "rw.py").write_text("def score(prompt, completion, answer):\n    return float(len(completion))\n")
    assert load_reward(f"{tmp_path / 'rw.py'}:score")("p", "abc", None) == 3.0
    assert load_reward("driftmerge.evaluation.rewards:boxed") is boxed
    from driftmerge.errors import InputError

    for spec, fragment in [("nope", "give exact-number"), (f"{tmp_path / 'rw.py'}:missing", "no function missing"),
                           ("no_such_module_x:f", "cannot import"), ("gone.py:f", "no file gone.py")]:  # fmt: skip
        with pytest.raises(InputError, match=fragment):
            load_reward(spec)


# ---- in-place scaling ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_in_place_scales_give_exactly_the_weights_apply_writes(arch, runs, drift, tmp_path):
    if arch == "llama":
        adapter = drift[1]
    else:  # tied embeddings and Conv1D
        adapter = tmp_path / "adapter"
        extract(runs["gpt2"].base, runs["gpt2"].checkpoints, out_dir=adapter, options=ExtractOptions(rank=1))
    drifted = DriftedModel(adapter)
    params = dict(drifted.model.named_parameters(remove_duplicate=False))
    for i, scale in enumerate((1.5, 0.0, -0.5, 2.0, 1.5)):  # any order, and back again
        drifted.set_scale(scale)
        out = apply_drift(adapter, tmp_path / f"m{i}", options=ApplyOptions(scale=scale, allow_negative_scale=True))
        written = load_weights(out.out_dir)
        compared = {name for name in written if name in params}
        assert set(drifted._deltas) <= compared  # every drifted tensor, tied ones included
        for name in compared:
            assert torch.equal(params[name].detach(), written[name]), (scale, name)


# ---- logit extrapolation ----------------------------------------------------------------------------------------
def test_the_processor_computes_the_extrapolated_logits(drift):
    run = drift[0]
    a, b = load_causal_lm(run.base), load_causal_lm(run.checkpoints[-1])
    tok = load_tokenizer(run.base)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        z_a = a(**enc).logits[:, -1].float()
        z_b = b(**enc).logits[:, -1].float()
    got = LogitExtrapolation(a, 1.5, enc["attention_mask"])(enc["input_ids"], z_b)
    torch.testing.assert_close(got, z_a + 1.5 * (z_b - z_a), rtol=1e-5, atol=1e-5)
    assert not torch.equal(z_a, z_b)


def test_alpha_one_and_zero_give_the_late_and_early_greedy_outputs(drift):
    run = drift[0]
    a, b = load_causal_lm(run.base), load_causal_lm(run.checkpoints[-1])
    tok = load_tokenizer(run.base)
    early = generate(a, tok, prompts=PROMPTS, opts=GREEDY)
    late = generate(b, tok, prompts=PROMPTS, opts=GREEDY)
    assert early != late  # the drift changes what the model writes
    assert generate(b, tok, prompts=PROMPTS, opts=GREEDY, early=a, alpha=1.0) == late
    assert generate(b, tok, prompts=PROMPTS, opts=GREEDY, early=a, alpha=0.0) == early
    far = generate(b, tok, prompts=PROMPTS, opts=GREEDY, early=a, alpha=1.5)
    one_by_one = [generate(b, tok, prompts=[p], opts=GREEDY, early=a, alpha=1.5)[0] for p in PROMPTS]
    assert far == one_by_one  # left padding and the lockstep cache line up


def test_generate_cli_writes_jsonl_and_refuses_other_tokenizers(drift, cli, tmp_path):
    run, _, prompts = drift
    out = tmp_path / "gen.jsonl"
    args = ["--prompts", prompts, "--max-new-tokens", "6", "--reward", "exact-number", "-o", out]
    code, _, err = cli("generate", "--early", run.base, "--late", run.checkpoints[-1], "--alpha", "1", *args)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tok = load_tokenizer(run.base)
    late = generate(load_causal_lm(run.checkpoints[-1]), tok, prompts=PROMPTS, opts=GREEDY)
    assert [r["completion"] for r in rows] == [c[0] for c in late]
    assert all(r["reward"] in (0.0, 1.0) for r in rows) and "mean reward" in err

    other = tmp_path / "other"
    make_run(other, seed=5, steps=(1,))
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=char_tokenizer()._tokenizer, pad_token="<eos>").save_pretrained(
        other / "base"
    )
    (other / "base" / "tokenizer.json").write_text(
        (other / "base" / "tokenizer.json").read_text().replace('"a"', '"A"')
    )
    code, _, err = cli("generate", "--early", other / "base", "--late", run.base, "--prompts", prompts)
    assert_one_line_error(code, err, 3, "different tokenizers")


# ---- sweep ---------------------------------------------------------------------------------------------------------
def _score_file(tmp_path):
    """A reward that depends on every character: the share of digits in the completion."""
    path = tmp_path / "digits.py"
    path.write_text("def share(prompt, completion, answer):\n"
                    "    return sum(c.isdigit() for c in completion) / max(len(completion), 1)\n")  # fmt: skip
    return f"{path}:share"


def test_sweep_table_png_json_and_the_in_place_completions(drift, cli, tmp_path):
    run, adapter, prompts = drift
    out = tmp_path / "sweep"
    args = ["--scales", "0,1,1.5,2", "--max-new-tokens", "6", "--reward", _score_file(tmp_path)]
    code, stdout, err = cli("sweep", adapter, "--prompts", prompts, *args, "-o", out, "--apply-best", tmp_path / "best")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"sweep.json", "sweep.md", "sweep.png", "completions.jsonl"}
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "sweep.json").read_text())
    comps = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for row in report["rows"]:
        mine = [c["reward"] for c in comps if c["scale"] == row["scale"]]
        assert row["mean"] == pytest.approx(sum(mine) / len(mine)) and row["n"] == len(PROMPTS)
    best = max(report["rows"], key=lambda r: (r["mean"], -abs(r["scale"] - 1)))
    assert report["best"]["scale"] == best["scale"] and f"best scale {best['scale']:g}" in stdout
    assert [c["scale"] for c in report["checkpoints"]] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert "| scale |" in (out / "sweep.md").read_text()

    # each scale's completions are those of the model `apply` writes at that scale
    tok = load_tokenizer(run.base)
    for scale in (0.0, 1.5):
        model_dir = apply_drift(adapter, tmp_path / f"m{scale}", options=ApplyOptions(scale=scale)).out_dir
        want = generate(load_causal_lm(model_dir), tok, prompts=PROMPTS, opts=GREEDY)
        assert [c["completion"] for c in comps if c["scale"] == scale] == [w[0] for w in want], scale
    assert len({tuple(c["completion"] for c in comps if c["scale"] == s) for s in (0.0, 2.0)}) == 2
    best_dir = tmp_path / "best"
    model_best = load_weights(best_dir)
    model_ref = load_weights(
        apply_drift(adapter, tmp_path / "ref", options=ApplyOptions(scale=report["best"]["scale"])).out_dir
    )
    assert all(torch.equal(model_best[k], model_ref[k]) for k in model_ref)


def test_sweep_logits_mode_and_sampling(drift, cli, tmp_path):
    _, adapter, prompts = drift
    base_args = ["sweep", adapter, "--prompts", prompts, "--scales", "0,1,1.5", "--max-new-tokens", "6"]
    code, _, err = cli(*base_args, "--mode", "logits", "-o", tmp_path / "lg")
    assert code == 0, err
    code, _, err = cli(*base_args, "-o", tmp_path / "wt")
    assert code == 0, err
    lg = [json.loads(x) for x in (tmp_path / "lg" / "completions.jsonl").read_text().splitlines()]
    wt = [json.loads(x) for x in (tmp_path / "wt" / "completions.jsonl").read_text().splitlines()]
    for alpha in (0.0, 1.0):  # alpha 0 = the base = scale 0; alpha 1 = the model at scale 1
        assert [c["completion"] for c in lg if c["scale"] == alpha] == [
            c["completion"] for c in wt if c["scale"] == alpha
        ]
    assert json.loads((tmp_path / "lg" / "sweep.json").read_text())["mode"] == "logits"

    sampled = [*base_args, "--scales", "1", "--samples", "3", "--temperature", "1.0", "--top-p", "0.9"]
    assert cli(*sampled, "-o", tmp_path / "s1")[0] == 0
    assert cli(*sampled, "-o", tmp_path / "s2")[0] == 0
    s1 = (tmp_path / "s1" / "completions.jsonl").read_text()
    assert s1 == (tmp_path / "s2" / "completions.jsonl").read_text()  # same seed, same samples
    assert len(s1.splitlines()) == 3 * len(PROMPTS)


@pytest.mark.slow
def test_sweep_with_an_external_evaluator(drift, cli, tmp_path):
    _, adapter, _ = drift
    script = tmp_path / "ev.py"
    script.write_text(
        "import sys, json\nfrom safetensors.torch import load_file\n"
        "w = load_file(sys.argv[1] + '/model.safetensors')['model.layers.0.mlp.down_proj.weight']\n"
        "print('evaluating...')\nprint(json.dumps({'reward': float(w.double().sum()), 'se': 0.5}))\n"
    )
    code, _, err = cli("sweep", adapter, "--eval-cmd", f"{sys.executable} {script} {{model_dir}}",
                       "--scales", "0,1,2", "-o", tmp_path / "ext")  # fmt: skip
    assert code == 0, err
    rows = json.loads((tmp_path / "ext" / "sweep.json").read_text())["rows"]
    m = [r["mean"] for r in rows]
    assert m[2] - m[1] == pytest.approx(m[1] - m[0], rel=1e-4) and m[1] != m[0]  # W0 + s·drift is linear in s
    assert all(r["se"] == 0.5 for r in rows)


def test_sweep_refusals(drift, cli, tmp_path):
    _, adapter, prompts = drift
    no_answer = tmp_path / "p.jsonl"
    no_answer.write_text('{"prompt": "1+1="}\n')
    code, _, err = cli("sweep", adapter, "--prompts", no_answer, "-o", tmp_path / "a")
    assert_one_line_error(code, err, 3, "p.jsonl:1", 'no "answer"')
    code, _, err = cli("sweep", adapter, "--eval-cmd", "true", "-o", tmp_path / "a")
    assert_one_line_error(code, err, 3, "{model_dir}")
    code, _, err = cli("sweep", adapter, "--eval-cmd", "false {model_dir}", "--scales", "1", "-o", tmp_path / "a")
    assert_one_line_error(code, err, 3, "--eval-cmd failed at scale 1")
    code, _, err = cli("sweep", adapter, "--eval-cmd", "echo fine {model_dir}", "--scales", "1", "-o", tmp_path / "a")
    assert_one_line_error(code, err, 3, "last line of output must be the reward")
    (tmp_path / "bad.py").write_text("def r(p, c, a):\n    raise KeyError('oops')\n")
    code, _, err = cli("sweep", adapter, "--prompts", prompts, "--reward", f"{tmp_path / 'bad.py'}:r",
                       "--max-new-tokens", "2", "-o", tmp_path / "a")  # fmt: skip
    assert_one_line_error(code, err, 3, "the reward function failed", "KeyError")
    code, _, err = cli("sweep", adapter, "--prompts", prompts, "--mode", "logits", "--apply-best", tmp_path / "b")
    assert code == 2 and "--apply-best" in err
    code, _, err = cli("sweep", adapter, "--prompts", prompts, "--scales", "1,1")
    assert_one_line_error(code, err, 3, "lists a scale twice")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
