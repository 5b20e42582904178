"""`apply` copies every side file the base needs to load and serve as it did (driftmerge.io.model_writer), from the
one list a Hub fetch downloads (driftmerge.hub.refs): a BERT WordPiece tokenizer, a multimodal processor with chat
templates, an ``auto_map`` model's remote code. Built in-process with transformers' own classes: no network."""

from __future__ import annotations

import json
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from fakehub import FakeHub, fake_hub_fixture  # noqa: F401
from synthetic import make_run

from driftmerge.commands.apply import apply_drift
from driftmerge.commands.extract import ExtractOptions, extract
from driftmerge.commands.options import ApplyOptions
from driftmerge.hub.refs import (
    BIN_FILES,
    CARD_FILE,
    CHAT_TEMPLATE_DIR,
    REMOTE_CODE_FILES,
    SAFETENSORS_FILES,
    SIDE_FILES,
    model_patterns,
    nested_except,
    resolve,
)
from driftmerge.io.model_writer import _copy_side_files, side_files

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
NOT_SIDE = {  # what a base folder or repo may hold that a model output must not get from it
    "README.md": "---\nlicense: mit\n---\n# the base\n",
    "training_args.bin": "x",
    "optimizer.pt": "x",
    "adapter_config.json": "{}",
    "train.py": "print('not the model's code')\n",
    "onnx/model.onnx": "x",
    "original/tokenizer.model": "x",
}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
TOOL_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"


def _write(folder: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _planted_run(model: torch.nn.Module, folder: Path, steps: tuple[int, ...] = (100, 200, 300)) -> list[Path]:
    """``base/`` and ``checkpoint-<s>/`` of ``model`` with every parameter at ``W0 + (s / s_last) · P``, ``P`` a random
    rank-1 matrix (dense for vectors) of per-element RMS 1e-3."""
    gen = torch.Generator().manual_seed(0)
    model.save_pretrained(folder / "base")
    params = dict(model.named_parameters())
    w0 = {n: p.detach().clone() for n, p in params.items()}
    planted = {}
    for n, w in w0.items():
        if w.dim() == 2:
            d = torch.randn(w.shape[0], 1, generator=gen) @ torch.randn(1, w.shape[1], generator=gen)
        else:
            d = torch.randn(w.shape, generator=gen)
        planted[n] = d / d.norm() * 1e-3 * w.numel() ** 0.5
    checkpoints = []
    for s in steps:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(w0[n] + s / steps[-1] * planted[n])
        model.save_pretrained(folder / f"checkpoint-{s}")
        checkpoints.append(folder / f"checkpoint-{s}")
    return checkpoints


def _extract_apply(base: Path, checkpoints: list[Path], tmp_path: Path, dtype: str = "auto", **extract_opts) -> Path:
    extract(base, checkpoints, out_dir=tmp_path / "adapter", options=ExtractOptions(rank=1, **extract_opts))
    return apply_drift(tmp_path / "adapter", tmp_path / "model", options=ApplyOptions(scale=1.5, dtype=dtype)).out_dir


def _assert_copied(base: Path, out: Path, want: list[str], *, dtype: str | None = None) -> None:
    """``want`` is what :func:`side_files` finds in ``base``; each is in ``out`` byte for byte (``config.json`` but
    its dtype when ``dtype`` is set), and ``out`` holds nothing else but weights and its own card."""
    assert side_files(base) == want
    base_files, out_files = _tree(base), _tree(out)
    copied = {rel for rel in base_files if rel.split("/")[0] in want}
    for rel in copied - {"config.json"} if dtype else copied:
        assert out_files[rel] == base_files[rel], rel
    if dtype:
        got, was = json.loads(out_files["config.json"]), json.loads(base_files["config.json"])
        changed = {k for k in got.keys() | was.keys() if got.get(k) != was.get(k)}
        assert changed and changed <= {"dtype", "torch_dtype"} and all(got[k] == dtype for k in changed)
    ours = {
        "README.md",
        *(rel for rel in out_files if rel.startswith("model") and rel.endswith((".safetensors", ".json"))),
    }
    assert set(out_files) == copied | ours
    assert out_files["README.md"] != base_files.get("README.md")  # our card, not the base's


# -- the one list ---------------------------------------------------------------------------------------------------


def test_download_and_copy_patterns_come_from_one_definition():
    from huggingface_hub.utils import filter_repo_objects

    for weights in (SAFETENSORS_FILES, BIN_FILES):
        patterns = model_patterns(weights)
        assert set(SIDE_FILES) <= set(patterns)  # every copy pattern is downloaded
        assert {f"{CHAT_TEMPLATE_DIR}/*", *REMOTE_CODE_FILES, CARD_FILE, *weights} <= set(patterns)
    repo = [
        *WEIGHTS, "model-00001-of-00002.safetensors", "config.json", "tokenizer.json", "vocab.txt", "spiece.model",
        "qwen.tiktoken", "preprocessor_config.json", "chat_template.jinja", "modeling_foo.py", "README.md",
        f"{CHAT_TEMPLATE_DIR}/tool_use.jinja", *NOT_SIDE, "onnx/modeling_foo.py", "a/b.json", "additional/x.json",
        "additional_chat_templatesX/y.jinja", "additional_chat_template/y.jinja", "adapter/config.json",
        ".gitattributes",
    ]  # fmt: skip
    nested = nested_except(CHAT_TEMPLATE_DIR)  # nothing below a folder but the chat templates
    got = set(filter_repo_objects(repo, allow_patterns=model_patterns(SAFETENSORS_FILES), ignore_patterns=nested))
    assert got == {
        "model.safetensors", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "config.json",
        "tokenizer.json", "vocab.txt", "spiece.model", "qwen.tiktoken", "preprocessor_config.json",
        "chat_template.jinja", "modeling_foo.py", "README.md", f"{CHAT_TEMPLATE_DIR}/tool_use.jinja", "train.py",
    }  # fmt: skip
    copied = {f for f in repo if "/" not in f and any(fnmatchcase(f, p) for p in SIDE_FILES)}
    assert not copied & {*WEIGHTS, "README.md", "adapter_config.json", "training_args.bin", "modeling_foo.py"}


def test_side_files_by_name_and_auto_map(tmp_path):
    """Every tokenizer, processor and template kind is found; remote code is what ``auto_map`` names (lists, nulls,
    a processor's nested map; another repo's ``repo--module.Class`` skipped) and what that imports relatively."""
    names = [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
        "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model",
        "sentencepiece.bpe.model", "qwen.tiktoken", "tekken.json", "processor_config.json", "preprocessor_config.json",
        "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json",
    ]  # fmt: skip
    _write(tmp_path, {n: "{}" for n in names} | NOT_SIDE | {f"{CHAT_TEMPLATE_DIR}/tool_use.jinja": TOOL_TEMPLATE})
    _write(tmp_path, {n: "x" for n in WEIGHTS})
    auto_map = {"AutoConfig": "configuration_foo.FooConfig", "AutoModelForCausalLM": "modeling_foo.FooForCausalLM"}
    _write(
        tmp_path,
        {
            "config.json": json.dumps({"model_type": "foo", "auto_map": auto_map}),
            "tokenizer_config.json": json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_foo.FooTok", None]}}),
            "processor_config.json": json.dumps(
                {
                    "auto_map": {"AutoProcessor": "other/repo--processing_bar.BarProcessor"},
                    "image_processor": {"auto_map": {"AutoImageProcessor": "image_processing_foo.FooImageProcessor"}},
                }
            ),
            "configuration_foo.py": "X = 1\n",
            "modeling_foo.py": "from .configuration_foo import X\nfrom .foo_layers import Y\nfrom ..up import Z\n",
            "foo_layers.py": "from .foo_utils import W\n",
            "foo_utils.py": "W = 1\n",
            "tokenization_foo.py": "T = 1\n",
            "image_processing_foo.py": "I = 1\n",
            "processing_bar.py": "not named: another repo's\n",
        },
    )
    code = [
        "configuration_foo.py", "foo_layers.py", "foo_utils.py", "image_processing_foo.py", "modeling_foo.py",
        "tokenization_foo.py",
    ]  # fmt: skip
    assert side_files(tmp_path) == [*sorted(names), CHAT_TEMPLATE_DIR, *code]
    out = tmp_path / "out"
    out.mkdir()
    _copy_side_files(tmp_path, out, None)
    tree, base = _tree(out), _tree(tmp_path)
    assert set(tree) == {*names, *code, f"{CHAT_TEMPLATE_DIR}/tool_use.jinja"}
    assert tree == {rel: base[rel] for rel in tree}


def test_a_folder_without_auto_map_or_configs_copies_what_it_has(tmp_path):
    _write(tmp_path, {"config.json": "not json", "tokenizer.json": "{}", "modeling_x.py": "", **NOT_SIDE})
    assert side_files(tmp_path) == ["config.json", "tokenizer.json"]


# -- real models, extracted and applied -----------------------------------------------------------------------------


def test_bert_wordpiece_tokenizer_is_copied_and_loads(tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "drift", "##s", "merge"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=32)
    )  # fmt: skip
    checkpoints = _planted_run(model, tmp_path / "run")
    base = tmp_path / "run" / "base"
    tok = BertTokenizer(vocab_file=str(tmp_path / "vocab.txt"))
    tok.save_pretrained(base)
    (base / "vocab.txt").write_bytes((tmp_path / "vocab.txt").read_bytes())  # as WordPiece repos ship it
    _write(base, NOT_SIDE)
    maybe = [n for n in ("generation_config.json", "special_tokens_map.json") if (base / n).exists()]
    want = sorted(["config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", *maybe])

    out = _extract_apply(base, checkpoints, tmp_path)
    _assert_copied(base, out, want)
    text = "hello worlds merge drift"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tok(text)["input_ids"]
    assert isinstance(AutoModelForMaskedLM.from_pretrained(out), BertForMaskedLM)


def test_processor_image_processor_and_chat_templates_are_copied_and_load(tmp_path):
    """A LLaVA-style processor (image processor + byte-level BPE tokenizer + chat templates), saved into a planted
    llama run's base; applied in bfloat16, so ``config.json`` alone changes. (Qwen2-VL's processor needs a video
    processor, which needs torchvision: not installed here.)"""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, CLIPImageProcessor, LlavaProcessor
    from transformers import Qwen2Tokenizer as BPETokenizer

    run = make_run(tmp_path / "run", arch="llama")
    tokens = ["a", "b", "c", "Ġ", "ab", "Ġa", "Ġab"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nĠ a\nĠa b\n")
    tok = BPETokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"))
    tok.add_tokens(["<image>"], special_tokens=True)
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(),
        tokenizer=tok,
        chat_template={"default": TEMPLATE, "tool_use": TOOL_TEMPLATE},
        patch_size=14,
    )
    proc.save_pretrained(run.base)
    if not (run.base / CHAT_TEMPLATE_DIR).is_dir():  # a transformers that saves named templates elsewhere
        _write(run.base, {f"{CHAT_TEMPLATE_DIR}/tool_use.jinja": TOOL_TEMPLATE})
    _write(run.base, NOT_SIDE)
    found = side_files(run.base)
    assert {"config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(found)
    assert {"chat_template.jinja", CHAT_TEMPLATE_DIR} <= set(found)

    out = _extract_apply(run.base, run.checkpoints, tmp_path, dtype="bfloat16")
    _assert_copied(run.base, out, found, dtype="bfloat16")
    loaded = AutoProcessor.from_pretrained(out)
    assert type(loaded) is LlavaProcessor
    assert loaded.chat_template == AutoProcessor.from_pretrained(run.base).chat_template
    assert type(AutoImageProcessor.from_pretrained(out)) is type(AutoImageProcessor.from_pretrained(run.base))
    assert AutoTokenizer.from_pretrained(out)("ab a<image>")["input_ids"] == tok("ab a<image>")["input_ids"]


REMOTE_CODE = {
    "configuration_foo.py": "from transformers import LlamaConfig\n\n\nclass FooConfig(LlamaConfig):\n"
    '    model_type = "foo"\n',
    "modeling_foo.py": "from transformers import LlamaForCausalLM\n\nfrom .configuration_foo import FooConfig\n"
    "from .foo_layers import GREETING\n\n\nclass FooForCausalLM(LlamaForCausalLM):\n    config_class = FooConfig\n"
    "    greeting = GREETING\n",
    "foo_layers.py": 'GREETING = "hi"\n',
}


def test_remote_code_of_an_auto_map_model_is_copied_and_loads(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, dynamic_module_utils

    run = make_run(tmp_path / "run", arch="llama")
    cfg = json.loads((run.base / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_foo.FooConfig",
        "AutoModelForCausalLM": "modeling_foo.FooForCausalLM",
    }
    (run.base / "config.json").write_text(json.dumps(cfg, indent=2))
    _write(run.base, REMOTE_CODE | NOT_SIDE)
    want = ["config.json", "generation_config.json", *sorted(REMOTE_CODE)]

    modules = tmp_path / "hf_modules"  # trust_remote_code imports copies of the code from here, not ~/.cache
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(modules))
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = _extract_apply(run.base, run.checkpoints, tmp_path, trust_remote_code=True)  # the skeleton: FooForCausalLM
    _assert_copied(run.base, out, want)
    assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)).__name__ == "FooConfig"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "FooForCausalLM" and model.greeting == "hi"


def test_a_hub_fetch_downloads_what_apply_copies(fake_hub: FakeHub, runs, tmp_path):
    """A remote-code repo with a processor, named chat templates and files no one should fetch: the fetch takes the
    side files, the code and the card; apply's copy of the fetched folder equals its copy of the local one."""
    base = runs["llama"].base
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_foo.FooForCausalLM"}
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    files |= {k: v.encode() for k, v in {**REMOTE_CODE, **NOT_SIDE}.items()}
    files |= {
        "config.json": json.dumps(cfg).encode(),
        "tokenizer.model": b"sentencepiece",
        "preprocessor_config.json": b'{"image_processor_type": "CLIPImageProcessor"}',
        "chat_template.jinja": TEMPLATE.encode(),
        f"{CHAT_TEMPLATE_DIR}/tool_use.jinja": TOOL_TEMPLATE.encode(),
    }
    fake_hub.add_repo("alice/foo", files)
    got = resolve("alice/foo")
    fetched = set(fake_hub.downloaded("alice/foo"))
    assert fetched == {
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "preprocessor_config.json",
        "chat_template.jinja", f"{CHAT_TEMPLATE_DIR}/tool_use.jinja", *REMOTE_CODE, "train.py", "README.md",
    }  # fmt: skip
    local = tmp_path / "local"
    for rel, data in files.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _copy_side_files(got.path, tmp_path / "a", None)
    _copy_side_files(local, tmp_path / "b", None)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert set(_tree(tmp_path / "a")) == fetched - {"model.safetensors", "README.md", "train.py"}
