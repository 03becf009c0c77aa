"""Command-line options generated from a configuration dataclass (defaults written once).

A service's parameters are declared once, as the fields of its config dataclass
(:class:`leukoflow.acquisition.service.AcquireConfig`, ...). :class:`ConfigOptions` turns
those fields into Typer options: the flag name from the field name (``max_delay_ms`` ->
``--max-delay-ms``, or a rename such as ``duration_s`` -> ``--duration``), the type from
the annotation, the help text from the class docstring's numpydoc ``Attributes`` section
(or ``field(metadata={"help": ...})``) with the dataclass default appended. An option not
given on the command line is ``None``, so :func:`leukoflow.core.config.resolve` layers
defaults < TOML < ``LEUKOFLOW_<SECTION>_<KEY>`` environment < flags.

The dataclass is imported only when a command's options are needed (its own ``--help``,
or running it), never for ``leukoflow --help``: the generated options are added to the
command on first use (:meth:`ConfigOptions.command_class`). Use::

    ACQUIRE = ConfigOptions("leukoflow.acquisition.service:AcquireConfig", "acquire",
                            flags={"duration_s": "--duration"})

    def acquire(ctx: typer.Context, json_out: ... = False) -> None:
        cfg = ACQUIRE.resolve(ctx)          # the resolved AcquireConfig

    def register(app: typer.Typer) -> None:
        app.command("acquire", cls=ACQUIRE.command_class())(acquire)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
import typer.core
import typer.main

_META_KEY = "leukoflow.cli.config_flags"


def _plain(text: str) -> str:
    """RST to plain help text: ````x```` -> ``x``, ``:mod:`~a.b``` -> ``b``."""
    text = re.sub(r":[a-z]+:`~([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    text = re.sub(r"\*([^*\s][^*]*)\*", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text).replace("[", "(").replace("]", ")")


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> description from the numpydoc ``Attributes`` section of ``cls``.

    ``a, b : str`` entries give both names the same text.
    """
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, ln in enumerate(lines[:-1])
                     if ln.strip() == "Attributes" and set(lines[i + 1].strip()) == {"-"})
    except StopIteration:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    desc: list[str] = []

    def flush() -> None:
        text = _plain(" ".join(d.strip() for d in desc).strip())
        for n in names:
            out[n] = text

    for i in range(start + 2, len(lines)):
        ln = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if ln and not ln[0].isspace() and nxt.strip() and set(nxt.strip()) == {"-"}:
            break  # next section
        if ln and not ln[0].isspace():
            flush()
            names = [n.strip() for n in ln.split(" : ", 1)[0].split(",") if n.strip()]
            desc = []
        elif ln.strip():
            desc.append(ln)
    flush()
    return out


def _unwrap_optional(typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return typ


def _show_default(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value) or "(empty)"
    if value is None:
        return "none"
    if value == "":
        return "(empty)"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@dataclass(frozen=True)
class OptionSpec:
    """One generated option: a dataclass field and how it appears on the command line."""

    name: str
    decls: tuple[str, ...]
    type: Any
    default: Any
    help: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: a single-flag switch stores this value when given (``--no-live`` -> False)
    sets: bool | None = None


@dataclass(frozen=True)
class ConfigOptions:
    """Options of one command generated from a config dataclass.

    Parameters
    ----------
    target : str
        ``"module:Class"`` of the dataclass (imported on first use).
    section : str
        Configuration section (TOML table and ``LEUKOFLOW_<SECTION>_`` env infix).
    include : tuple of str, optional
        Fields that become options, in this order (default: every init field).
    exclude : tuple of str
        Fields left out (the command sets them itself).
    flags : mapping
        Field -> flag name(s) where the default ``--field-name`` does not fit
        (e.g. ``{"duration_s": "--duration"}``; a bool field's ``--x/--no-x`` form too).
    extra : mapping
        Field -> further ``typer.Option`` keywords (``min``, ``max``, ``help``, ``hidden``).
    """

    target: str
    section: str
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    flags: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    extra: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ the dataclass
    @property
    def dataclass_name(self) -> str:
        """The dataclass's name (``AcquireConfig``)."""
        return self.target.rpartition(":")[2]

    def dataclass(self) -> type:
        """Import and return the config dataclass."""
        module, _, name = self.target.partition(":")
        cls = getattr(importlib.import_module(module), name)
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{self.target} is not a dataclass")
        return cls

    def specs(self) -> list[OptionSpec]:
        """The options, one per selected field, with type, default and help."""
        cls = self.dataclass()
        hints = typing.get_type_hints(cls)
        docs = attribute_docs(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = (set(self.include or ()) | set(self.exclude) | set(self.flags)
                   | set(self.extra)) - set(fields)
        if unknown:
            raise ValueError(f"{self.target} has no fields {sorted(unknown)}")
        names = [n for n in (self.include or fields) if n not in self.exclude]
        out = []
        for name in names:
            f = fields[name]
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = None
            typ = _unwrap_optional(hints[name])
            decl = self.flags.get(name)
            if decl is None and typ is bool:  # a switch that flips the default
                decl = f"--{'no-' if default else ''}{name.replace('_', '-')}"
            decls = (decl or f"--{name.replace('_', '-')}",) if isinstance(
                decl, str | None) else tuple(decl)
            sets = None
            if typ is bool and not any("/" in d for d in decls):
                sets = not default
            extra = dict(self.extra.get(name, {}))
            text = extra.pop("help", None) or f.metadata.get("help") or docs.get(name, "")
            if sets is None:
                text = f"{text} (default: {_show_default(default)})"
            else:
                text = (f"{text} (sets {name} {_show_default(sets)}; default "
                        f"{_show_default(default)})")
            out.append(OptionSpec(name, decls, typ, default, text.strip(), extra, sets))
        # the help names the other options (snake_case field names) by their flags
        flag = {o.name: o.decls[0].split("/")[0] for o in out if "_" in o.name}
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, flag)) + r")\b")
        return [dataclasses.replace(o, help=pattern.sub(
            lambda m, me=o.name: m.group(0) if m.group(0) == me else flag[m.group(0)],
            o.help)) for o in out] if flag else out

    def parameters(self) -> list[Any]:
        """Typer/Click parameters of the generated options (built through Typer itself)."""
        params = []
        for s in self.specs():
            typ = s.type if s.type in (bool, int, float, str) else str
            metavar = None
            if typing.get_origin(s.type) in (tuple, list):
                metavar = "A,B,..."
            opt = typer.Option(*s.decls, help=s.help, show_default=False, metavar=metavar,
                               rich_help_panel=self.panel, **s.extra)
            params.append(inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY,
                                            annotation=Annotated[typ | None, opt],
                                            default=None))

        def _generated(**_: Any) -> None:  # pragma: no cover - signature carrier only
            """Generated options."""

        _generated.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        carrier = typer.Typer(add_completion=False)
        carrier.command()(_generated)
        return list(typer.main.get_command(carrier).params)

    @property
    def panel(self) -> str:
        """Help panel of the generated options (where else they can be set)."""
        return f"Config (TOML table {self.section}, LEUKOFLOW_{self.section.upper()}_*)"

    # ------------------------------------------------------------------ commands
    def command_class(self) -> type:
        """A Typer command class that adds the generated options on first use."""
        return _with_options(typer.core.TyperCommand, self)

    def group_class(self) -> type:
        """A Typer group class whose callback gets the generated options."""
        return _with_options(typer.core.TyperGroup, self)

    # ------------------------------------------------------------------ values
    def given(self, ctx: typer.Context) -> dict[str, Any]:
        """The generated options' values of this invocation (``None``: not given)."""
        return dict(ctx.meta.get(_META_KEY, {}).get(self.target, {}))

    def resolve(self, ctx: typer.Context, **overrides: Any) -> Any:
        """The config: defaults < TOML < env < flags < ``overrides`` (``None`` skipped).

        A configuration error ends the command with exit status 2 and a clear message.
        """
        from leukoflow.core.config import ConfigError, resolve

        values = {**self.given(ctx), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return resolve(self.section, self.dataclass(), values)
        except (ConfigError, TypeError, ValueError) as exc:
            typer.echo(f"leukoflow {ctx.info_name}: {exc}", err=True)
            raise typer.Exit(2) from exc


def _with_options(base: type, options: ConfigOptions) -> type:
    """Subclass ``base`` (TyperCommand or TyperGroup) to carry ``options`` lazily."""

    class _ConfigCommand(base):  # type: ignore[misc, valid-type]
        config_options = options

        def _generated_params(self) -> list[Any]:
            gen = self.__dict__.get("_generated")
            if gen is None:
                gen = options.parameters()
                own = {p.name for p in self.params}
                own_flags = {o for p in self.params for o in (*p.opts, *p.secondary_opts)}
                for p in gen:
                    if p.name in own or (set(p.opts) | set(p.secondary_opts)) & own_flags:
                        raise ValueError(f"{options.target}: field {p.name!r} ({p.opts[0]}) "
                                         f"is also an option of the command {self.name!r}")
                self._generated = gen
                self._sets = {sp.name: sp.sets for sp in options.specs()}
                self.params = [*self.params, *gen]
            return gen

        def get_params(self, ctx: Any) -> list[Any]:
            self._generated_params()
            return super().get_params(ctx)

        def invoke(self, ctx: Any) -> Any:
            values = {}
            for p in self._generated_params():
                v = ctx.params.pop(p.name, None)
                sets = self._sets.get(p.name)
                values[p.name] = sets if (v and sets is not None) else v
            ctx.meta.setdefault(_META_KEY, {})[options.target] = values
            return super().invoke(ctx)

    _ConfigCommand.__name__ = f"{base.__name__}With{options.dataclass_name}"
    return _ConfigCommand
