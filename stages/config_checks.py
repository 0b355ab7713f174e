"""Checks of a command's config files and values, before jsonargparse's own messages, which name neither the
file nor the stage: a section that is no mapping (`world: 5`, or empty), a file that is no YAML mapping, and a
stage's bad value (jsonargparse names the key within the stage, not the stage)."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace

from stages.config import CurriculumConfig
from stages.paths import names_a_file

# jsonargparse's message on one stage's value names the key within the stage, never the stage.
KEY_BLOCK = re.compile(r'Parser key "(?P<key>[\w.]+)":')
UNKNOWN_KEY = re.compile(
    r"Option '(?P<option>\w+)' is not accepted|Group '(?P<group>[\w.]+)' does not accept option '(?P<group_option>\w+)'"
)


def wanted_setting(message: str) -> tuple[str, str | None] | None:
    """(dotted key within the stage, the value shown or None) that jsonargparse's message on a stage refuses."""
    body = message.split("'stages.config.StageSpec'", 1)[-1]
    key, unknown = KEY_BLOCK.search(body), UNKNOWN_KEY.search(body)
    if key and (unknown is None or key.start() < unknown.start()):  # a value of the wrong type
        block = body[key.end() :]
        end = re.search(r'Parser key "|Problem with given class_path', block)
        block = block[: end.start()] if end else block  # this key's lines only
        # A union's inner errors show the value's items ("Got value: auto"); its last line, the whole value.
        shown = re.findall(r"Given value: (.*)", block) or re.findall(r"Got value: (.*)", block)
        return key["key"], shown[-1].strip() if shown else None
    if unknown:
        return unknown["option"] or f"{unknown['group']}.{unknown['group_option']}", None
    return None


def stage_settings(argv: tuple[str, ...], default_configs: tuple[str, ...], cwd: str) -> list[tuple]:
    """(stage, dotted key, value, where) of every stage key the config files and the flags of `argv` set (the
    files' names relative to `cwd`: jsonargparse works in a config file's folder while it reads it)."""
    settings = []

    def walk(stage: str, key: str, value: object, where: str) -> None:
        settings.append((stage, key, value, where))
        for sub, item in value.items() if isinstance(value, dict) else ():
            walk(stage, f"{key}.{sub}" if key else str(sub), item, where)

    files = [*default_configs] + [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    for name in files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]:
        path = Path(cwd) / name
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8")) if names_a_file(path) else None
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue
        stages = content.get("stages") if isinstance(content, dict) else None
        for stage, spec in stages.items() if isinstance(stages, dict) else ():
            walk(str(stage), "", spec, f"--config {name}")
    for i, arg in enumerate(argv):
        flag, given, value = arg.partition("=")
        if flag.startswith("--stages.") and flag.count(".") > 1:
            _, stage, key = flag.split(".", 2)
            value = value if given else argv[i + 1] if i + 1 < len(argv) else ""
            try:  # as jsonargparse reads a flag's value: "[0, auto]" is a list
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
            settings.append((stage, key, value, "the command line"))
    return settings


def stage_culprits(message: str, argv: tuple[str, ...], default_configs: tuple[str, ...], cwd: str) -> list[str]:
    """ "stages.<name>.<key> (where)" of the settings a jsonargparse message on a stage's value means: those of
    its key with the value it shows, or with it as an item (none when no setting has it: a guess could name a
    valid one)."""
    wanted = wanted_setting(message)
    if wanted is None:
        return []
    return [
        f"stages.{stage}.{key} ({where})"
        for stage, key, value, where in stage_settings(argv, default_configs, cwd)
        if key == wanted[0] and (wanted[1] is None or wanted[1] in (str(value), *map(str, _items(value))))
    ]


def _items(value: object) -> list:
    """A list's items (jsonargparse may show the one it refuses), else none."""
    return value if isinstance(value, list) else []


class CommandParser(ArgumentParser):
    """jsonargparse's parser, with a hint where its message does not name the culprit: a misspelt stage name
    in a dotted flag makes a new stage, which then lacks `trainable` or `max_words`; a bad value or unknown key
    of one stage is named without its stage."""

    argv: tuple[str, ...] = ()  # the command line, set by main()
    cwd = ""  # the working folder the command line's paths are relative to, set by main()
    default_configs: tuple[str, ...] = ()  # the curriculum's default config files, set by build_parser()

    def error(self, message: str, ex: Exception | None = None):
        if "Problem with given class_path 'stages.config.StageSpec'" in message:
            culprits = stage_culprits(message, self.argv, self.default_configs, self.cwd or os.getcwd())
            if culprits:
                message += "\n  Set in: " + "; ".join(dict.fromkeys(culprits))
        if 'Parser key "stages"' in message and "arguments are required" in message:
            names = sorted(
                {arg.split(".")[1] for arg in self.argv if arg.startswith("--stages.") and arg.count(".") > 1}
            )
            culprit = f" (here one of {', '.join(f'--stages.{name}.*' for name in names)})" if names else ""
            message += (
                f"\n  A stage that only a dotted flag names{culprit} is a new stage, which needs trainable and "
                "max_words: is a stage name misspelt? `--print_config` shows the stages of the config files."
            )
        super().error(message, ex)


def not_a_mapping(schema, values, where: str = "") -> tuple[str, object] | None:
    """(dotted key, value) of the first section of the config (a dataclass field, or a stage) whose value is
    not a mapping, as `world: 5` or `--stages.align.trainer [1]` give; None when every section is one.
    `schema`: the config's dataclass, or {key: type} of its sections."""
    if isinstance(schema, dict):
        hints = schema
    else:
        types = typing.get_type_hints(schema)
        hints = {f.name: types[f.name] for f in dataclasses.fields(schema)}
    for name, hint in hints.items():
        if not isinstance(values, (dict, Namespace)) or name not in values:
            continue
        # An empty section (`trainer:` with its keys commented out) is None: named here too, not left to
        # jsonargparse's "functools.partial(...) argument after ** must be a mapping, not NoneType".
        value, key = values[name], f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            sections = {key: (hint, value)}
        elif typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            if not isinstance(value, (dict, Namespace)):
                return key, value
            sections = {f"{key}.{name}": (typing.get_args(hint)[1], item) for name, item in value.items()}
        else:
            continue
        for section_key, (section_cls, section) in sections.items():
            if not isinstance(section, (dict, Namespace)):
                return section_key, section
            found = not_a_mapping(section_cls, section, f"{section_key}.")
            if found:
                return found
    return None


def mapping_error(misplaced: tuple[str, object]) -> str:
    """The message for `not_a_mapping`'s finding."""
    key, value = misplaced
    empty = " (an empty section: give its keys, or leave it out)" if value is None else ""
    return f"{key} must be a mapping of its keys, got {value!r}{empty}"


def config_sections(argv: tuple[str, ...]) -> object:
    """The schema `not_a_mapping` checks a --config file of the command `argv` against (None: none to check)."""
    if argv[:1] in (("curriculum",), ("compare",)) or argv[:2] == ("bench", "train"):
        return CurriculumConfig
    if argv[:1] == ("data",):
        from datamodules.world import WorldConfig
        from stages.data import InputSpec

        return {"input": InputSpec, "world": WorldConfig}
    return None


def check_config_files(parser: ArgumentParser, argv: tuple[str, ...]) -> None:
    """A --config file (compare's --profile too) that is not a YAML mapping of config keys, or has an empty or
    scalar section, ends the command naming the file: jsonargparse's message named "<unicode string>", or
    nothing ("Unexpected config: ", "argument after ** must be a mapping, not NoneType")."""
    flags = ("--config", "--profile") if argv[:1] == ("compare",) else ("--config",)
    given = [(a, b) for a, b in zip(argv, argv[1:], strict=False) if a in flags]
    given += [tuple(a.split("=", 1)) for a in argv if a.split("=", 1)[0] in flags and "=" in a]
    for flag, name in given:
        path = Path(name)
        if not names_a_file(path):
            continue  # an inline '{seed: 3}', or a missing file, which jsonargparse names itself
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            parser.error(f"{flag} {path}: not valid YAML: {error}")
        except UnicodeDecodeError as error:  # a traceback
            parser.error(f"{flag} {path}: not UTF-8 text ({error})")
        if content is None:  # jsonargparse's message named nothing: "Unexpected config: "
            parser.error(f"{flag} {path}: holds no config keys (empty, only comments, or null)")
        if not isinstance(content, dict):
            parser.error(f"{flag} {path}: holds a {type(content).__name__}, not a mapping of config keys")
        schema = config_sections(argv)
        misplaced = not_a_mapping(schema, content) if schema is not None else None
        if misplaced:
            parser.error(f"{flag} {path}: {mapping_error(misplaced)}")
