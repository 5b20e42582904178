"""Model references on the Hugging Face Hub: ``org/name`` or ``org/name@revision`` as inputs.

A reference that is not an existing local path and reads as a repo id is fetched with
``huggingface_hub.snapshot_download`` into the usual Hugging Face cache, restricted to the top-level weights
(safetensors when the repo has them, else ``pytorch_model*.bin``), the side files ``apply`` copies (``SIDE_FILES``:
config, tokenizer, processor and chat template files, and the ``additional_chat_templates/`` folder), the remote code
(top-level ``*.py``) and the card (for the license). ``HF_TOKEN`` / ``hf auth login``, ``HF_ENDPOINT``,
``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` work as everywhere else in the Hugging Face stack: offline,
a reference resolves from the cache or fails with one line saying so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driftmerge.errors import InputError, first_line

_REVISION = re.compile(r"[\w./-]+")  # after the @ of org/name@revision: a branch, a tag, a commit, refs/pr/N
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")

CHAT_TEMPLATE_DIR = "additional_chat_templates"  # transformers' named chat templates, <name>.jinja: copied whole
# Everything a model folder needs beside its weights to load and serve as the base does: the one list that a Hub
# fetch downloads and `apply` copies (top level only, matched with fnmatch as huggingface_hub does). Never weights,
# never README.md (apply writes its own card), never adapter_config.json (the output would read as an adapter).
SIDE_FILES = [
    "config.json",
    "generation_config.json",
    # tokenizers of every kind: tokenizer.json (fast), tokenizer_config.json, tokenizer.model (Llama sentencepiece)
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",  # vocab.txt (WordPiece), vocab.json (byte-level BPE)
    "merges.txt",
    "*.model",  # sentencepiece: spiece.model (T5), sentencepiece.bpe.model (XLM-R), spm.model (DeBERTa-v2)
    "*.tiktoken",
    "tekken.json",  # Mistral's tokenizer for mistral-common
    # processors of multimodal models: processor_config.json, preprocessor_config.json (image processors and
    # feature extractors), video_preprocessor_config.json
    "*processor_config.json",
    "audio_tokenizer_config.json",
    "chat_template.*",  # chat_template.jinja, chat_template.json (a processor's, older)
]
REMOTE_CODE_FILES = ["*.py"]  # an auto_map model's code: fetched whole; apply copies the modules it needs
CARD_FILE = "README.md"  # fetched for the base's license, never copied
SAFETENSORS_FILES = ["*.safetensors", "model.safetensors.index.json"]
BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
ADAPTER_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "drift_extras.safetensors",
    "driftmerge.json",
    CARD_FILE,
]


def model_patterns(weights: list[str]) -> list[str]:
    """What a model fetch downloads: ``weights``, the side files and the chat templates' folder, every top-level
    ``*.py`` (the remote code of an ``auto_map`` model) and the card."""
    return [*weights, *SIDE_FILES, f"{CHAT_TEMPLATE_DIR}/*", *REMOTE_CODE_FILES, CARD_FILE]


def nested_except(folder: str) -> list[str]:
    """fnmatch patterns matching every path below a top-level folder of a repo, except below ``folder``.

    fnmatch's ``*`` crosses ``/``, so ``*.safetensors`` alone would fetch ``onnx/model.safetensors`` too, and it has
    no negation: a nested path is ignored when it starts with ``folder[:i]`` and then a character other than
    ``folder[i]`` (``folder[:i][!c]*/*``), with ``folder[:i]/`` (a shorter folder name), or with ``folder`` and then
    a character other than ``/`` (a longer one).
    """
    return [
        *(f"{folder[:i]}[!{c}]*/*" for i, c in enumerate(folder)),
        *(f"{folder[:i]}/*" for i in range(1, len(folder))),
        f"{folder}[!/]*/*",
    ]


_NESTED = nested_except(CHAT_TEMPLATE_DIR)  # the top level (no onnx/, original/ copies) and the chat templates


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None  # as the user gave it; None = the default branch

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class Resolved:
    """A model reference made local: ``path`` to read, ``hub`` to record (None for a local folder)."""

    path: Path
    ref: str  # as given
    hub: dict[str, Any] | None = None  # {"repo_id", "revision", "commit"}

    @property
    def label(self) -> str:
        """What step numbers are read from: the folder, or for a Hub ref its revision (else its repo name)."""
        if self.hub is None:
            return str(self.path)
        rev = self.hub["revision"]
        if rev is None or _COMMIT.match(rev):  # a commit's hex digits are not a step
            return self.hub["repo_id"]
        return f"{self.hub['repo_id']}/{rev.replace('/', '-')}"


def parse_hub_ref(ref: str) -> HubRef | None:
    """``org/name[@rev]`` as a :class:`HubRef` when ``ref`` is not an existing local path and ``org/name`` is a repo
    id (:func:`is_repo_id`); else None."""
    if Path(ref).exists():
        return None
    repo_id, at, rev = ref.partition("@")
    if not is_repo_id(repo_id) or (at and not _REVISION.fullmatch(rev)):
        return None
    return HubRef(repo_id, rev if at else None)


def resolve(ref: str | Path, kind: str = "model") -> Resolved:
    """A local folder as is; a Hub reference downloaded (or found in the cache). ``kind``: model | adapter."""
    ref_s = str(ref)
    hub = parse_hub_ref(ref_s) if not isinstance(ref, Path) else None
    if hub is None:
        return Resolved(Path(ref_s), ref_s)
    if kind == "adapter":
        path = _download(hub, ADAPTER_FILES)
    else:
        path = _download(hub, model_patterns(SAFETENSORS_FILES))
        if not any(path.glob("*.safetensors")):  # an older repo: its weights are pickled
            path = _download(hub, model_patterns(BIN_FILES))
    return Resolved(path, ref_s, {"repo_id": hub.repo_id, "revision": hub.revision, "commit": path.name})


def resolve_recorded(record: dict[str, Any], kind: str = "model") -> Resolved:
    """The input a ``driftmerge.json`` entry names: its local path while it exists, else its Hub repo at the commit."""
    path = Path(record["ref"])
    hub = record.get("hub")
    if path.exists() or not hub:
        return Resolved(path, record["ref"], hub)
    r = resolve(f"{hub['repo_id']}@{hub['commit']}", kind)
    return Resolved(r.path, r.ref, {**hub, "commit": r.hub["commit"] if r.hub else hub["commit"]})


def cache_origin(folder: str | Path) -> dict[str, Any] | None:
    """The Hub origin ``{"repo_id", "revision", "commit"}`` of a local folder that is a snapshot in a Hugging Face
    cache (``CACHE/models--org--name/snapshots/COMMIT/``: the cache of ``HF_HUB_CACHE`` / ``HF_HOME``, or any other
    one), else None. Offline: ``huggingface_hub.scan_cache_dir`` reads the cache's own layout (``refs/``,
    ``snapshots/``). ``revision`` is None when ``main`` points at that commit, else a ref that does, else the commit.
    """
    from huggingface_hub.constants import REPO_ID_SEPARATOR

    try:
        path = Path(folder).resolve(strict=True)  # a link to the snapshot counts as the snapshot
    except (OSError, RuntimeError):
        return None
    repo_dir = path.parent.parent
    if path.parent.name != "snapshots" or not repo_dir.name.startswith(f"models{REPO_ID_SEPARATOR}"):
        return None  # not laid out as a cached model snapshot: do not scan anything
    from huggingface_hub import scan_cache_dir

    try:
        cache = scan_cache_dir(repo_dir.parent)
    except Exception:  # not a readable cache after all: the folder is then only a local folder
        return None
    for repo in cache.repos:
        if repo.repo_type != "model" or repo.repo_path != repo_dir:
            continue
        for rev in repo.revisions:
            if rev.snapshot_path == path:
                refs = sorted(rev.refs)
                revision = None if "main" in refs else refs[0] if refs else rev.commit_hash
                return {"repo_id": repo.repo_id, "revision": revision, "commit": rev.commit_hash}
    return None


def _download(ref: HubRef, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    login = "log in with `hf auth login` or set HF_TOKEN"
    local = f"{ref}: no such local folder, and"  # it read as a Hub id only because no local path has its name
    try:
        return Path(
            snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns, ignore_patterns=_NESTED)
        )
    except GatedRepoError as exc:
        raise InputError(f"{ref}: a gated repo; accept its conditions on its Hub page, then {login}") from exc
    except RepositoryNotFoundError as exc:
        raise InputError(
            f"{local} no Hub repo {ref.repo_id} this token can see (check the name; for a private repo, {login})"
        ) from exc
    except RevisionNotFoundError as exc:
        raise InputError(f"{ref}: the Hub repo {ref.repo_id} has no revision {ref.revision!r}") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise InputError(
            f"{local} as a Hub repo it is not in the local Hugging Face cache, and the Hub is not reachable"
            " (HF_HUB_OFFLINE=1, or no network); check the path, or fetch the repo once online"
        ) from exc
    except HfHubHTTPError as exc:
        raise InputError(f"{local} the Hub answered {first_line(exc)}") from exc
    except ValueError as exc:  # an argument huggingface_hub refuses (the repo id was checked before)
        raise InputError(f"{local} the Hub client refused it ({first_line(exc)})") from exc
    except OSError as exc:  # connection refused, DNS, disk
        raise InputError(f"{local} it could not be fetched from the Hub ({first_line(exc)})") from exc


def card_metadata(folder: Path) -> dict[str, Any]:
    """The YAML front matter of ``folder/README.md`` (a model card), or {} when there is none or it is unreadable."""
    card = folder / "README.md"
    if not card.is_file():
        return {}
    from huggingface_hub import metadata_load

    try:
        return metadata_load(card) or {}
    except Exception:  # a card we only read for the license: a malformed one is the base author's, not an error
        return {}


def base_license(folder: Path) -> str | None:
    """The ``license`` its model card declares, to carry over to what is derived from it."""
    lic = card_metadata(folder).get("license")
    return lic if isinstance(lic, str) else None


def _repo_id_problem(text: str) -> str | None:
    """Why ``text`` is not a Hub repo id, or None when it is one: ``NAMESPACE/NAME`` (exactly one ``/``) that
    huggingface_hub's ``validate_repo_id`` accepts (``[A-Za-z0-9_.-]``, at most 96 characters a part, no ``--`` or
    ``..``, no leading or trailing ``-``/``.``, no ``.git`` ending)."""
    from huggingface_hub.utils import validate_repo_id  # imported here: it costs a third of a second at start-up

    try:
        validate_repo_id(text)
    except ValueError as exc:
        return f"not a Hub repo id ({first_line(exc)})"
    if text.count("/") != 1:
        return "give the repo id as NAMESPACE/NAME (your user name or an organization)"
    return None


def is_repo_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub repo id ``NAMESPACE/NAME`` (the one rule for inputs, cards and outputs)."""
    return _repo_id_problem(text) is None


def check_repo_id(repo_id: str) -> None:
    """A repo id to push to (:func:`is_repo_id`), else one :class:`InputError` line saying why not."""
    problem = _repo_id_problem(repo_id)
    if problem is not None:
        raise InputError(f"{repo_id!r}: {problem}")
