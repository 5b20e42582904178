"""Publish an adapter or model folder to the Hugging Face Hub in one commit, with its model card.

``HfApi.create_repo`` (``exist_ok``) then one ``HfApi.create_commit`` holding every file of the folder, the card
(``README.md``, with the ``driftmerge analyze`` summary and figures appended when an analysis is given or lies in
``FOLDER/analysis``) and the analysis files under ``analysis/``. The folder itself is never modified. A repo that
already holds something not made by driftmerge is refused unless the push goes to a branch or a pull request.

The base's Hub id (``--base-model``, else the one the adapter records or its cached base shows) goes into the card's
``base_model`` and an adapter's ``adapter_config.json`` (``base_model_name_or_path``, which is never sent as a local
path). An adapter's card as driftmerge wrote it is rebuilt from ``driftmerge.json`` for the repo (its usage names
the repo); a card the user edited is sent as it is, with only its ``base_model`` set.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from driftmerge.errors import InputError, OutputError, first_line
from driftmerge.hub.refs import check_repo_id

if TYPE_CHECKING:
    from driftmerge.schema import DriftMeta

logger = logging.getLogger("driftmerge")

ANALYSIS_FILES = ("report.json", "report.md")
LOGIN = "run `hf auth login` or set HF_TOKEN to a token with write access"


@dataclass
class PushPlan:
    """What a push sends: ``files`` as (path in the repo, local file), and the card text."""

    folder: Path
    repo_id: str
    kind: str  # adapter | model
    files: list[tuple[str, Path]]
    card: str
    replaced: dict[str, bytes] = field(default_factory=dict)  # files sent with this content instead of their own

    @property
    def total_bytes(self) -> int:
        sizes = (len(self.replaced[n]) if n in self.replaced else p.stat().st_size for n, p in self.files)
        return sum(sizes) + len(self.card.encode())


@dataclass
class PushResult:
    plan: PushPlan
    dry_run: bool
    url: str | None = None  # the repo (or the pull request) on the Hub
    commit: str | None = None
    pr_url: str | None = None
    notes: list[str] = field(default_factory=list)


def plan_push(
    folder: str | Path, repo_id: str, *, analysis: str | Path | None = None, base_model: str | None = None
) -> PushPlan:
    """Check ``folder`` and ``repo_id`` and list what a push would send (no network); ``base_model``: the base's Hub
    id for the card and ``adapter_config.json`` (default: the one the folder records or its cached base shows)."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if base_model is not None:
        check_repo_id(base_model)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (give an adapter folder from `extract` or a model from `apply`)")
    if (folder / "adapter_config.json").is_file():
        kind = "adapter"
    elif (folder / "config.json").is_file():
        kind = "model"
    else:
        raise InputError(f"{folder}: neither an adapter (adapter_config.json) nor a model folder (config.json)")
    files = [
        (p.relative_to(folder).as_posix(), p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    files = [(name, p) for name, p in files if name != "README.md"]
    from driftmerge.schema import META, read_meta  # pydantic loads only when a push is planned

    meta = read_meta(folder / META) if kind == "adapter" and (folder / META).is_file() else None
    replaced, base_model = _adapter_config(folder, meta, base_model) if kind == "adapter" else ({}, base_model)
    card = _card_text(folder, meta, repo_id, base_model)
    analysis_dir = Path(analysis) if analysis is not None else folder / "analysis"
    if analysis is not None and not (analysis_dir / "report.json").is_file():
        raise InputError(f"{analysis_dir}: no report.json here (give the folder `driftmerge analyze -o` wrote)")
    if (analysis_dir / "report.json").is_file():
        inside = analysis_dir.resolve().is_relative_to(folder.resolve())
        extra = _analysis_files(analysis_dir)
        if not inside:
            files += [(f"analysis/{p.name}", p) for p in extra]
        prefix = analysis_dir.resolve().relative_to(folder.resolve()).as_posix() if inside else "analysis"
        card += _analysis_section(analysis_dir, [f"{prefix}/{p.name}" for p in extra if p.suffix == ".png"])
    return PushPlan(folder, repo_id, kind, files, card, replaced)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    analysis: str | Path | None = None,
    base_model: str | None = None,
) -> PushResult:
    """Push ``folder`` to the model repo ``repo_id`` (created if missing) as one commit; ``dry_run`` only plans;
    ``base_model`` as in :func:`plan_push`."""
    plan = plan_push(folder, repo_id, analysis=analysis, base_model=base_model)
    from huggingface_hub import get_token

    if dry_run:
        note = "a token is set" if get_token() else f"no Hugging Face token is set ({LOGIN})"
        return PushResult(plan, True, notes=[note])
    require_token(repo_id)
    return _push(plan, private, revision, create_pr)


def require_token(repo_id: str) -> None:
    """A push needs a token (``hf auth login`` or ``HF_TOKEN``): checked before any long work starts."""
    from huggingface_hub import get_token

    if not get_token():
        raise OutputError(f"{repo_id}: no Hugging Face token to push with; {LOGIN}")


def _push(plan: PushPlan, private: bool, revision: str | None, create_pr: bool) -> PushResult:
    from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api, repo_id = HfApi(), plan.repo_id
    result = PushResult(plan, False)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        _check_not_taken(api, repo_id, to_branch_or_pr=revision is not None or create_pr)
        _validate_card(ModelCard(plan.card), result)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        ops = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=plan.replaced.get(name) or str(path))
            for name, path in plan.files
        ]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card.encode()))
        info = api.create_commit(
            repo_id,
            ops,
            commit_message=f"driftmerge: upload {plan.kind} {plan.folder.name}",
            revision=revision,
            create_pr=create_pr,
        )
    except RepositoryNotFoundError as exc:  # the namespace is not ours, or the token cannot see it
        raise OutputError(f"{repo_id}: the Hub refused it ({_status(exc)}): no write access to it; {LOGIN}") from exc
    except HfHubHTTPError as exc:
        raise OutputError(_http_message(repo_id, exc)) from exc
    except OSError as exc:  # connection refused, DNS
        raise OutputError(f"{repo_id}: could not reach the Hub ({first_line(exc)}); nothing was pushed") from exc
    result.url = str(info.pr_url or url)
    result.commit = info.oid
    result.pr_url = info.pr_url
    return result


def _check_not_taken(api: Any, repo_id: str, to_branch_or_pr: bool) -> None:
    """A repo that holds files not made by driftmerge takes a branch or a pull request, not a commit on main."""
    if to_branch_or_pr:
        return
    info = api.repo_info(repo_id)
    files = [s.rfilename for s in info.siblings or [] if s.rfilename not in (".gitattributes",)]
    tags = (info.card_data.to_dict() if info.card_data else {}).get("tags") or []
    if files and "driftmerge" not in tags:
        raise OutputError(
            f"{repo_id}: the name is taken by a repo with other content ({len(files)} files, not made by driftmerge);"
            " choose another name, or add to it with --revision BRANCH or --create-pr"
        )


def _validate_card(card: Any, result: PushResult) -> None:
    """The Hub's metadata check (``ModelCard.validate``): a refusal stops the push, an unreachable check is noted."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        card.validate()
    except ValueError as exc:
        raise OutputError(f"the model card's metadata was refused by the Hub: {first_line(exc)}") from exc
    except (HfHubHTTPError, OSError) as exc:
        result.notes.append(f"the card's metadata could not be checked ({first_line(exc)})")


def _http_message(repo_id: str, exc: Any) -> str:
    status = _status(exc)
    if status == 401:
        return f"{repo_id}: the Hub rejected the token (401); {LOGIN}"
    if status == 403:
        return f"{repo_id}: no write access (403): the token is read-only or not a member of that namespace; {LOGIN}"
    if status == 409:
        return f"{repo_id}: the name is taken (409); choose another name"
    return f"{repo_id}: the Hub answered {first_line(exc)}; nothing was pushed"


def _status(exc: Any) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _adapter_config(
    folder: Path, meta: DriftMeta | None, base_model: str | None
) -> tuple[dict[str, bytes], str | None]:
    """``adapter_config.json`` as it is pushed (in the returned dict when it changes) and the base's Hub id it names:
    ``base_model``, else a Hub id it already names, else the one ``meta`` records or its cached base shows, else
    null: never a local path."""
    from driftmerge.hub.cards import base_hub_id, hub_id_or_none

    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({first_line(exc)})") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path}: holds a {type(config).__name__}, not the object PEFT writes")
    current = config.get("base_model_name_or_path")
    named = hub_id_or_none(current) if isinstance(current, str) else None
    hub_id = base_model or named or (base_hub_id(meta.base.model_dump()) if meta is not None else None)
    if hub_id == current:
        return {}, hub_id
    text = json.dumps({**config, "base_model_name_or_path": hub_id}, indent=2) + "\n"
    return {"adapter_config.json": text.encode()}, hub_id


def _card_text(folder: Path, meta: DriftMeta | None, repo_id: str, base_model: str | None) -> str:
    """The card pushed: an adapter's as driftmerge wrote it (or missing) rebuilt from ``meta`` for ``repo_id``, else
    the folder's own with its ``base_model`` set (when one is given or found)."""
    from driftmerge.hub.cards import adapter_card

    card = folder / "README.md"
    text = card.read_text() if card.is_file() else None
    if meta is not None and (text is None or _written_by_driftmerge(text, meta, folder)):
        return adapter_card(meta, meta.summary, where=repo_id, base_model=base_model)
    if text is None:
        raise InputError(f"{folder}: no README.md model card (driftmerge writes one; was it removed?)")
    return _with_base_model(text, base_model) if base_model else text


def _written_by_driftmerge(text: str, meta: DriftMeta, folder: Path) -> bool:
    """Whether an adapter's card is the one driftmerge wrote into ``folder`` (the user has not edited it)."""
    from driftmerge.hub.cards import OLD_PLACEHOLDER, adapter_card

    return OLD_PLACEHOLDER in text or text in (adapter_card(meta, meta.summary, where=w) for w in (folder.name, None))


def _with_base_model(text: str, base_model: str) -> str:
    """A card's text with ``base_model: base_model`` in its YAML front matter (added when it has none)."""
    from huggingface_hub import ModelCard

    card = ModelCard(text, ignore_metadata_errors=True)
    if card.data.get("base_model") == base_model:
        return text
    card.data["base_model"] = base_model
    return str(card)


def _analysis_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and (p.name in ANALYSIS_FILES or p.suffix == ".png")]


def _analysis_section(folder: Path, figures: list[str]) -> str:
    from driftmerge.hub.cards import analysis_section

    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder / 'report.json'}: not readable JSON ({exc})") from exc
    return analysis_section(report, figures)
