"""``driftmerge push DIR REPO_ID``: publish an adapter or model folder to the Hugging Face Hub."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from driftmerge_cli.common import F, human_bytes

if TYPE_CHECKING:
    from driftmerge.hub.publish import PushResult


@click.command("push")
@click.argument("folder", type=click.Path(path_type=str))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", metavar="BRANCH", help="Commit to this branch (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--analysis", metavar="DIR", help="A `driftmerge analyze` folder to add [default: FOLDER/analysis].")
@click.option(
    "--base-model",
    metavar="REPO_ID",
    help="The base's Hub id, for the card's base_model and the adapter's adapter_config.json [default: the one "
    "recorded, or shown by the base's Hugging Face cache folder].",
)
@click.option("--dry-run", is_flag=True, help="Show what would be pushed, and the card; contact nobody.")
def push_cmd(
    folder: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    analysis: str | None,
    base_model: str | None,
    dry_run: bool,
) -> None:
    """Push FOLDER (from `extract` or `apply`) to the model repo REPO_ID in one commit, with its model card.

    Needs a token with write access (`hf auth login` or HF_TOKEN); HF_ENDPOINT is honoured."""
    from driftmerge.hub.publish import push_folder

    result = push_folder(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        dry_run=dry_run,
        analysis=analysis,
        base_model=base_model,
    )
    report_push(result)


def push_option(f: F) -> F:
    """``--push-to-hub REPO_ID`` and ``--hub-private`` for commands that write a folder."""
    f = click.option("--hub-private", is_flag=True, help="With --push-to-hub: create the repo private.")(f)
    return click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", help="Then push the output there.")(f)


def push_after(out_dir: object, repo_id: str | None, private: bool) -> None:
    """Push what a command wrote, when ``--push-to-hub`` was given."""
    if repo_id is None:
        return
    from driftmerge.hub.publish import push_folder

    report_push(push_folder(str(out_dir), repo_id, private=private))


def check_push_target(repo_id: str | None) -> None:
    """Fail on a malformed repo id or a missing token before the long work, not after it."""
    if repo_id is None:
        return
    from driftmerge.hub.publish import require_token
    from driftmerge.hub.refs import check_repo_id

    check_repo_id(repo_id)
    require_token(repo_id)


def report_push(r: PushResult) -> None:
    p = r.plan
    size = human_bytes(p.total_bytes)
    if r.dry_run:
        lines = [f"dry run: would push {p.kind} {p.folder} to {p.repo_id}: {len(p.files) + 1} files, {size}"]
        lines += [f"  {name}" + (" (base_model_name_or_path set)" if name in p.replaced else "") for name, _ in p.files]
        lines += ["  README.md (model card below)", "", p.card]
    else:
        lines = [f"pushed {p.kind} {p.folder} to {r.url}: {len(p.files) + 1} files, {size}, commit {r.commit}"]
    lines += [f"note: {n}" for n in r.notes]
    click.echo("\n".join(lines))
