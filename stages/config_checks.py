"""Checks of a command's config files and values, before jsonargparse's own messages, which name neither the
file nor the stage: a section that is no mapping (`world: 5`, or empty), a file that is no YAML mapping, and a
stage's bad value (jsonargparse names the key within the stage, not the stage)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace

from stages.config import CurriculumConfig
from stages.paths import names_a_file

# jsonargparse's message on one stage's value names the key within the stage, never the stage.
STAGE_VALUE = re.compile(
    r'Parser key "(?P<key>[\w.]+)":\n(?:\s+.*\n)*?\s+.*(?:Got value|Given value): (?P<value>.*)'
    r"|Option '(?P<option>\w+)' is not accepted"
    r"|Group '(?P<group>[\w.]+)' does not accept option '(?P<group_option>\w+)'"
)


def stage_settings(argv: tuple[str, ...], default_configs: tuple[str, ...]) -> list[tuple[str, str, object, str]]:
    """(stage, dotted key, value, where) of every stage key the config files and the flags of `argv` set."""
    settings = []

    def walk(stage: str, key: str, value: object, where: str) -> None:
        settings.append((stage, key, value, where))
        for sub, item in value.items() if isinstance(value, dict) else ():
            walk(stage, f"{key}.{sub}" if key else str(sub), item, where)

    files = [*default_configs] + [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    for name in files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]:
        try:
            content = yaml.safe_load(Path(name).read_text(encoding="utf-8")) if names_a_file(Path(name)) else None
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
            settings.append((stage, key, value, "the command line"))
    return settings


def stage_culprits(message: str, argv: tuple[str, ...], default_configs: tuple[str, ...]) -> list[str]:
    """ "stages.<name>.<key> (where)" of the settings a jsonargparse message on a stage's value means."""
    found = STAGE_VALUE.search(message.split("'stages.config.StageSpec'", 1)[-1])
    if found is None:
        return []
    if found["key"]:  # a value of the wrong type: the settings of that key with that value
        wanted = (found["key"], found["value"].strip())
    else:  # an unknown key: every setting of it
        wanted = (found["option"] or f"{found['group']}.{found['group_option']}", None)
    return [
        f"stages.{stage}.{key} ({where})"
        for stage, key, value, where in stage_settings(argv, default_configs)
        if key == wanted[0] and (wanted[1] is None or str(value) == wanted[1])
    ]


class CommandParser(ArgumentParser):
    """jsonargparse's parser, with a hint where its message does not name the culprit: a misspelt stage name
    in a dotted flag makes a new stage, which then lacks `trainable` or `max_words`; a bad value or unknown key
    of one stage is named without its stage."""

    argv: tuple[str, ...] = ()  # the command line, set by main()
    default_configs: tuple[str, ...] = ()  # the curriculum's default config files, set by build_parser()

    def error(self, message: str, ex: Exception | None = None):
        if "Problem with given class_path 'stages.config.StageSpec'" in message:
            culprits = stage_culprits(message, self.argv, self.default_configs)
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
