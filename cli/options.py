"""Click options generated from the option models of :mod:`driftmerge.commands.options` (their fields'
:class:`~driftmerge.commands.flags.Flag`).

A command built with ``cls=LazyCommand`` takes some of its parameters from a function (:func:`later`), called the
first time click reads the command's parameters (to parse them or to print its ``--help``): listing the commands
(``driftmerge --help``) loads no option models, nor pydantic.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, overload

import click

if TYPE_CHECKING:
    from driftmerge.commands.flags import Flag, OptionsModel

    M = TypeVar("M", bound=OptionsModel)

F = TypeVar("F", bound=Callable[..., Any])


class _Later:
    """Stands for the parameters ``build()`` returns until the command first needs them."""

    def __init__(self, build: Callable[[], list[click.Parameter]]) -> None:
        self.build = build


class LazyCommand(click.Command):
    """A click command whose :func:`later` parameters are built the first time ``params`` is read."""

    _params: list[Any]

    @property
    def params(self) -> list[click.Parameter]:
        if any(isinstance(p, _Later) for p in self._params):
            self._params = [q for p in self._params for q in (p.build() if isinstance(p, _Later) else [p])]
        return self._params

    @params.setter
    def params(self, value: list[Any]) -> None:
        self._params = value


def later(build: Callable[[], list[click.Parameter]]) -> Callable[[F], F]:
    """Put the parameters ``build()`` returns at this place among the command's decorators (with
    ``cls=LazyCommand``)."""

    def decorator(f: F) -> F:
        params: list[Any] = f.__dict__.setdefault("__click_params__", [])  # where click's decorators collect
        params.append(_Later(build))
        return f

    return decorator


def flag_options(model: type[OptionsModel], names: Iterable[str] | None = None) -> list[click.Option]:
    """One click option per field of ``model`` (all, or ``names``) that has a flag, in field order; each passes
    its value to the command under the field's name, with the field's default as its command-line text."""
    from driftmerge.commands.flags import default_text, flags

    have = flags(model)
    out = []
    for name in have if names is None else names:
        flag, default = have[name], default_text(model, name)
        if model.model_fields[name].annotation is bool:  # an on/off switch, off by default
            out.append(click.Option([flag.name, name], is_flag=True, default=False, help=flag.help, hidden=flag.hidden))
            continue
        out.append(
            click.Option(
                [flag.name, name],
                type=_click_type(model.model_fields[name].annotation, flag),
                default=default,
                show_default=default is not None,
                metavar=flag.metavar,
                help=flag.help,
                hidden=flag.hidden,
            )
        )
    return out


@overload
def options_from(model: type[M], values: dict[str, Any], optional: Literal[False] = False) -> M: ...
@overload
def options_from(model: type[M], values: dict[str, Any], optional: bool) -> M | None: ...
def options_from(model: type[M], values: dict[str, Any], optional: bool = False) -> M | None:
    """Take ``model``'s fields out of a command's keyword arguments and build it. A bad value stays an
    ``InputError`` naming its flag (exit code 3); flags that do not go together, or one that needs another the user
    left out, are a usage error (exit code 2). ``optional``: None when none of the flags was given."""
    from driftmerge.commands.flags import OptionsError, flag_name, flags

    mine = {name: values.pop(name) for name in flags(model)}
    given = {name: value for name, value in mine.items() if value is not None}
    if optional and not given:
        return None
    missing = [flag_name(model, n) for n, f in model.model_fields.items() if f.is_required() and n not in given]
    if missing:
        names = [flag_name(model, n) for n in given]
        given_text = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise click.UsageError(f"{given_text} {'needs' if len(names) == 1 else 'need'} {' and '.join(missing)}")
    try:
        return model(**given)
    except OptionsError as exc:
        if exc.usage:
            raise click.UsageError(str(exc)) from None
        raise


def _click_type(annotation: Any, flag: Flag) -> click.ParamType:
    """The flag's own parser, a choice for a ``Literal``, else the (first non-None) type: int, float or text."""
    if flag.parse is not None:
        return ParsedText(flag.parse, flag.metavar or "TEXT")
    union = get_origin(annotation) in (Union, types.UnionType)
    args = [a for a in get_args(annotation) if a is not type(None)] if union else []
    kind = args[0] if args else annotation
    if get_origin(kind) is Literal:
        return click.Choice(get_args(kind))
    by_type: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING}
    return by_type[kind]


class ParsedText(click.ParamType):
    """Command-line text read by ``parse`` (a flag's, driftmerge.commands.options): its ``ValueError`` becomes
    click's "Invalid value for …" usage error (exit code 2)."""

    def __init__(self, parse: Callable[[str], Any], name: str) -> None:
        self.parse, self.name = parse, name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
