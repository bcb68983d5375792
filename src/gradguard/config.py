"""Configuration files for the CLI: TOML (stdlib ``tomllib``), JSON, and YAML when PyYAML is installed.

A file holds option names as keys (``eps = 0.1``, ``batch_size = 64``; dashes or underscores). Top-level keys
apply to every command that takes them (``eps`` to train / attack / evaluate / ..., not to ``report``); a table
named after a command (``[train]``, ``[evaluate]``) overrides them for that command, and every key in it must be
an option of that command. Command-line flags override the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError

COMMANDS = ("demo", "train", "attack", "evaluate", "diagnose", "report", "list")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a .toml, .json, .yaml or .yml file into a dict; ConfigError if missing, unreadable or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: no file at {str(path)!r}; pass --config PATH to a .toml, .json or .yaml file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config: cannot read {str(path)!r} ({error})") from None
    if suffix == ".toml":
        data = _parse_toml(text, path)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"config: {str(path)!r} is not valid JSON ({error})") from None
    elif suffix in (".yaml", ".yml"):
        data = _parse_yaml(text, path)
    else:
        raise ConfigError(f"config: unsupported file type {suffix!r} for {str(path)!r}; use .toml, .json or .yaml")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {str(path)!r} must hold a table of options, got {type(data).__name__}")
    return data


def split_options(command: str, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level keys, the command's own table) of a parsed config, keys normalised to option names.

    The caller applies a top-level key only when the command takes it; a key in the command's table that the
    command does not take is an error."""
    shared = {key: value for key, value in data.items() if not (key in COMMANDS and isinstance(value, dict))}
    section = data.get(command)
    own = section if isinstance(section, dict) else {}
    return _normalised(shared), _normalised(own)


def options_for(command: str, data: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys, then the command's own table on top, keys normalised (no check of what the command takes)."""
    shared, own = split_options(command, data)
    return {**shared, **own}


def _normalised(options: dict[str, Any]) -> dict[str, Any]:
    return {str(key).replace("-", "_"): value for key, value in options.items()}


def _parse_toml(text: str, path: Path) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError("config: TOML needs Python >= 3.11 or `pip install tomli`; or use a .json config") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config: {str(path)!r} is not valid TOML ({error})") from None


def _parse_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(f"config: {str(path)!r} is YAML but PyYAML is not installed; `pip install pyyaml` or "
                          "write the config as .toml") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config: {str(path)!r} is not valid YAML ({' '.join(str(error).split())})") from None
