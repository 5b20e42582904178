"""What a recipe may hold: its ``extract``, ``apply`` and ``push`` stages, as pydantic models.

The ``extract`` and ``apply`` stages are the options models of :mod:`driftmerge.commands.options` (the same fields,
defaults and rules as the command-line flags and the library) plus the stage's own keys: its inputs, its output
folder and what becomes of it. Unknown keys are refused, and no value is converted silently (``"3"`` is not 3).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from driftmerge.commands.options import ADAPTER_DIR, ApplyOptions, ExtractOptions, RunDirSelection, repo_id_rule


class _Stage(BaseModel):
    """A recipe stage: unknown keys refused, values not converted; not frozen (the recipe fills in defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)


class _Written(_Stage):
    """The keys of a stage that writes a folder: replace it or not, then push it to the Hub or not."""

    overwrite: bool = False
    push_to_hub: str | None = None  # repo id to push the stage's output to, or null
    hub_private: bool = False  # with push_to_hub: create that repo private

    @field_validator("push_to_hub")
    @classmethod
    def _push(cls, value: str | None) -> str | None:
        return repo_id_rule(value)


class ExtractStage(_Written, ExtractOptions):
    """``driftmerge extract``: fit the drift of base + checkpoints and write a PEFT adapter folder."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)

    base: str = Field(min_length=1)  # local model folder or Hub id org/name[@revision]
    checkpoints: list[str] | None = Field(default=None, min_length=1)  # folders or Hub ids; or run_dir instead
    run_dir: RunDirSelection | None = None
    output: str = Field(default=ADAPTER_DIR, min_length=1)  # adapter folder to write

    @model_validator(mode="after")
    def _inputs(self) -> ExtractStage:
        if (self.checkpoints is None) == (self.run_dir is None):
            raise ValueError("give exactly one of checkpoints (a list) or run_dir (a run folder)")
        if self.steps is not None and self.checkpoints is not None and len(self.steps) != len(self.checkpoints):
            n, k = len(self.steps), len(self.checkpoints)
            raise ValueError(f"steps gives {n} step{'s' * (n != 1)} for {k} checkpoint{'s' * (k != 1)}")
        return self


class ApplyStage(_Written, ApplyOptions):
    """``driftmerge apply``: write the model (or a scaled adapter) at a scale or step along the drift."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)

    adapter: str | None = Field(default=None, min_length=1)  # default: the extract stage's output
    output: str | None = Field(default=None, min_length=1)  # default: driftmerge-model / driftmerge-adapter-scaled

    @model_validator(mode="after")
    def _output(self) -> ApplyStage:
        if self.output is None:
            self.output = self.default_output
        return self


class PushStage(_Stage):
    """Upload a folder to the Hugging Face Hub (:func:`driftmerge.hub.publish.push_folder`)."""

    folder: str | None = Field(default=None, min_length=1)  # default: the apply output, else the extract output
    repo_id: str  # org/name (created when missing)
    private: bool = False  # create the repo private
    revision: str | None = Field(default=None, min_length=1)  # branch to push to (default: main)
    create_pr: bool = False  # open a pull request instead of committing
    dry_run: bool = False  # say what would be uploaded, upload nothing
    analysis: str | None = Field(default=None, min_length=1)  # a `driftmerge analyze` folder to add to the card

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, value: str) -> str:
        return str(repo_id_rule(value))


class Recipe(_Stage):
    """A job: up to three stages, run in the order extract, apply, push."""

    extract: ExtractStage | None = None
    apply: ApplyStage | None = None
    push: PushStage | None = None

    @model_validator(mode="after")
    def _wire(self) -> Recipe:
        if self.extract is None and self.apply is None and self.push is None:
            raise ValueError("give at least one stage: extract, apply or push")
        if self.apply is not None and self.apply.adapter is None:
            if self.extract is None:
                raise ValueError("apply.adapter: required when the recipe has no extract stage")
            self.apply.adapter = self.extract.output
        if self.push is not None and self.push.folder is None:
            if self.apply is not None:
                self.push.folder = self.apply.output
            elif self.extract is not None:
                self.push.folder = self.extract.output
            else:
                raise ValueError("push.folder: required when the recipe has no extract or apply stage")
        return self
