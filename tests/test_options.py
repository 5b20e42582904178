"""The options of extract and apply are defined once: the flags, the recipe keys and the library agree."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
from driftmerge_cli.apply import apply_cmd
from driftmerge_cli.extract import extract_cmd
from driftmerge_cli.options import options_from

from driftmerge.commands.flags import OptionsError, flag_args, flags
from driftmerge.commands.options import ApplyOptions, ExtractOptions, RunDirSelection
from driftmerge.commands.recipe_schema import ApplyStage, ExtractStage
from driftmerge.core.device_names import is_device
from driftmerge.core.devices import DTYPES, FACTOR_DTYPES, resolve_device
from driftmerge.core.lowrank import SVD_METHODS
from driftmerge.core.trajectory import FITS
from driftmerge.errors import InputError


def choices(model, name):
    return get_args(model.model_fields[name].annotation)


def test_choices_are_the_library_s():
    assert choices(ExtractOptions, "fit") == tuple(FITS)
    assert choices(ExtractOptions, "svd") == tuple(SVD_METHODS)
    assert choices(ExtractOptions, "factor_dtype") == tuple(FACTOR_DTYPES)
    assert set(choices(ApplyOptions, "dtype")) == {"auto", *DTYPES}


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps", "tpu-ish", "cuda:", "CPU", ""])
def test_one_device_rule(name):
    """The options accept a device exactly when resolve_device knows its name."""
    try:
        resolve_device(name)
        known = True
    except InputError as exc:
        known = "unknown device" not in str(exc)  # a known name without the hardware
    assert is_device(name) == known
    if not known:
        with pytest.raises(InputError, match="--device must be auto, cpu or cuda"):
            ExtractOptions(device=name)


COMMANDS = [(extract_cmd, (RunDirSelection, ExtractOptions)), (apply_cmd, (ApplyOptions,))]


@pytest.mark.parametrize(("command", "models"), COMMANDS)
def test_every_flag_comes_from_a_field(command, models):
    made = {p.name: p for p in command.params}
    for model in models:
        for name, flag in flags(model).items():
            assert flag.name in made[name].opts and made[name].help == flag.help and made[name].hidden == flag.hidden


def parsed(command, args, *models):
    """The option models a command line gives, as the commands build them."""
    ctx = command.make_context(command.name, list(args))
    values = dict(ctx.params)
    return [options_from(model, values) for model in models]


def test_a_plan_line_parses_back_to_the_same_options():
    options = ExtractOptions(
        steps=[10, 20], rank=0.9, fit="pca", device="cpu", include="mlp|attn", max_memory=3 << 30, niter=4, seed=7
    )
    (again,) = parsed(extract_cmd, ["b", "c1", "c2", *flag_args(options, ExtractOptions)], ExtractOptions)
    assert again == options and type(again.rank) is float
    apply = ApplyOptions(step=450.0, format="adapter", dtype="float32", max_shard_size="2GB", base="b")
    assert parsed(apply_cmd, ["a", *flag_args(apply, ApplyOptions)], ApplyOptions) == [apply]
    assert parsed(extract_cmd, ["b", "c"], ExtractOptions) == [ExtractOptions()]  # the flags' defaults are the models'


def test_stages_extend_the_options():
    assert set(ExtractOptions.model_fields) < set(ExtractStage.model_fields)
    assert set(ApplyOptions.model_fields) < set(ApplyStage.model_fields)


def test_library_errors_name_the_flag():
    with pytest.raises(InputError, match=r"^--rank must be an integer rank of at least 1"):
        ExtractOptions(rank=0)
    with pytest.raises(OptionsError, match=r"^give exactly one of --scale or --step$") as exc:
        ApplyOptions(scale=1.0, step=2.0)
    assert exc.value.usage
    with pytest.raises(InputError, match="unknown option rnak"):
        ExtractOptions(rnak=2)


def test_hidden_factorization_flags(cli, tmp_path):
    code, out, _ = cli("extract", "--help")
    assert code == 0 and "--niter" not in out and "--max-memory" in out
    (options,) = parsed(extract_cmd, ["b", "c", "--niter", "5", "--oversample", "4"], ExtractOptions)
    assert (options.niter, options.oversample) == (5, 4)


def test_listing_the_commands_loads_no_option_models():
    probe = (
        "import sys\n"
        "from driftmerge_cli.main import cli\n"
        "cli.main(['--help'], standalone_mode=False)\n"
        "print('pydantic' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip().endswith("False")
