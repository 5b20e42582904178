"""How an option appears on the command line, and how its errors read: the machinery behind
:mod:`driftmerge.commands.options` (which defines the options of ``extract`` and ``apply`` with it).

An options model is a pydantic model whose fields carry a :class:`Flag` in their ``Annotated`` metadata. The CLI
generates its click options from the flags (``driftmerge_cli.options``); :func:`flag_args` writes a model's values
back as command-line arguments (a recipe's plan). A bad value reads as one line naming the flag the user typed,
``--rank must be …`` (:class:`OptionsError`), or the key in a recipe (``extract.rank: must be …``, from
:func:`problem`). Loads neither torch nor click.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails, PydanticUndefined

from driftmerge.errors import InputError

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)


# ---- how a field appears on the command line ------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """A field's command-line flag. ``parse`` turns the typed text into the value (a ``ValueError`` is a usage
    error); without it the field's type decides (int, float, str, or a choice for a ``Literal``). ``text`` writes
    a value back as command-line text (in a recipe's plan, and as the default ``--help`` shows)."""

    name: str  # e.g. "--rank"
    help: str
    metavar: str | None = None  # None: click's own (INTEGER, FLOAT, TEXT, [a|b|c])
    parse: Callable[[str], Any] | None = None
    text: Callable[[Any], str] = str
    hidden: bool = False  # accepted, not listed in --help


def flags(model: type[BaseModel]) -> dict[str, Flag]:
    """The fields of ``model`` that have a flag, in field order."""
    return {name: flag for name, field in model.model_fields.items() if (flag := _flag(field)) is not None}


def _flag(field: FieldInfo) -> Flag | None:
    return next((m for m in field.metadata if isinstance(m, Flag)), None)


def flag_name(model: type[BaseModel], name: str) -> str:
    """How the user names field ``name`` on the command line (its field name when it has no flag)."""
    field = model.model_fields.get(name)
    flag = _flag(field) if field is not None else None
    return flag.name if flag is not None else name


def flag_args(values: BaseModel, model: type[BaseModel], *, names: Iterable[str] | None = None) -> list[str]:
    """``values``' fields of ``model`` (all, or ``names``) as command-line arguments, in field order, leaving out
    those at their default (the type counts: rank 1.0, a share, is not rank 1)."""
    out: list[str] = []
    for name in model.model_fields if names is None else names:
        field, flag, value = model.model_fields[name], _flag(model.model_fields[name]), getattr(values, name)
        if flag is None or value is None or (value == field.default and type(value) is type(field.default)):
            continue
        out += [flag.name] if isinstance(value, bool) else [flag.name, flag.text(value)]
    return out


def split_at_output(model: type[OptionsModel]) -> tuple[list[str], list[str]]:
    """``model``'s fields before and after ``-o OUTPUT`` on the command line (in ``--help`` and in a plan)."""
    names = list(model.model_fields)
    cut = names.index(model.OUTPUT_AFTER) + 1 if model.OUTPUT_AFTER is not None else 0
    return names[:cut], names[cut:]


def default_text(model: type[BaseModel], name: str) -> str | None:
    """The default of field ``name`` as command-line text (None when it has none)."""
    field, flag = model.model_fields[name], _flag(model.model_fields[name])
    if flag is None or field.default is None or field.default is PydanticUndefined or isinstance(field.default, bool):
        return None
    return flag.text(field.default)


# ---- errors ----------------------------------------------------------------------------------------------------
class Conflict(ValueError):
    """Options that do not go together. ``{field}`` in the message becomes the flag (``--scale``) on the command
    line and in the library, the key (``scale``) in a recipe."""

    def text(self, name: Callable[[str], str]) -> str:
        return str(self.args[0]).format_map(_Names(name))


class _Names(dict[str, str]):
    def __init__(self, name: Callable[[str], str]) -> None:
        super().__init__()
        self.name = name

    def __missing__(self, key: str) -> str:
        return self.name(key)


class OptionsError(InputError):
    """Option values the library cannot use, in one line that names their flags. ``usage``: flags that do not go
    together (the CLI's bad-usage exit code 2) rather than a bad value (exit code 3)."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage

    @classmethod
    def of(cls, model: type[BaseModel], exc: ValidationError) -> OptionsError:
        errors = exc.errors()
        parts = []
        for err in errors:
            if not err["loc"]:  # the model's own check: a conflict between fields
                parts.append(problem(err, lambda name: flag_name(model, name)))
                continue
            name = flag_name(model, str(err["loc"][0]))
            if err["type"] == "extra_forbidden":
                parts.append(f"unknown option {name} (allowed: {', '.join(model.model_fields)})")
            elif err["type"] == "missing":
                parts.append(f"{name} is required")
            else:
                parts.append(f"{name} {problem(err)}")
        return cls("; ".join(parts), usage=all(not err["loc"] for err in errors))


def problem(err: ErrorDetails, name: Callable[[str], str] = str) -> str:
    """What is wrong with a value, worded to follow its flag or key: ``must be …, got …``. A :class:`Conflict`
    names its fields with ``name``."""
    error = err.get("ctx", {}).get("error")
    if isinstance(error, Conflict):
        return error.text(name)
    msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "must be", 1)
    if err["type"] in ("too_short", "string_too_short") and err.get("ctx", {}).get("min_length") == 1:
        msg = "must not be empty"
    if err["type"].endswith("_type"):  # a value of the wrong type: say what was given
        msg += f", got {kind(err['input'])}"
    elif err["type"] != "value_error":  # pydantic's own checks (a choice, a bound, a length): say what was given
        msg += f", got {err['input']!r}"
    return msg


def kind(value: Any) -> str:
    """``a list``, ``a string``, ``a number`` …: what kind of value the user gave."""
    return {list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


class OptionsModel(BaseModel):
    """Options: unknown names refused, no silent conversions (``"3"`` is not 3), frozen once checked.
    Constructing one with a bad value raises :class:`OptionsError`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    OUTPUT_AFTER: ClassVar[str | None] = None  # -o OUTPUT comes after this field on the command line (None: first)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise OptionsError.of(type(self), exc) from None

    # pydantic calls a model's own __init__ when it validates one nested in another (a recipe's stage); marked as
    # its base __init__, this one runs only when called, and a recipe's errors keep their keys (extract.rank: …)
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def of(cls: type[M], values: BaseModel) -> M:
        """The options among ``values``' fields (e.g. a recipe stage's), as this model."""
        return cls.model_validate({name: getattr(values, name) for name in cls.model_fields})
