"""`--help` of the main job: its flags, the shipped configs, and every config field with its value
and a line about it. The lines are the comments of configs/default.py, where each field is
defined once; the values are those of the config the command names (the quickstart without one).
"""

import os
import re

from resnet_jax import config_files

_SECTION = re.compile(r"^\s*config\.(\w+)\s*=\s*ml_collections\.ConfigDict")
_TOP_FIELD = re.compile(r"^\s*config\.(\w+)\s*=")
_FIELD = re.compile(r"^\s+(\w+)=[^#]*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s*#\s*(.*)$")


def comments(source: str) -> dict[str, str]:
    """"section.field" (or "field" at the top) -> its comment in a config file's source: the text
    after the field on its line, the comment lines that continue it, or the comment lines above a
    top-level field."""
    found, section, last, above = {}, "", None, []
    for line in source.splitlines():
        comment = _COMMENT.match(line)
        if comment:
            if last:  # a comment continuing the field above it
                found[last] = f"{found.get(last, '')} {comment.group(1)}".strip()
            else:
                above.append(comment.group(1))
            continue
        last = None
        if match := _SECTION.match(line):
            section, above = match.group(1), []
        elif match := _TOP_FIELD.match(line):
            section = ""
            if above:
                found[match.group(1)] = " ".join(above)
            above = []
        elif (match := _FIELD.match(line)) and section:
            last = f"{section}.{match.group(1)}"
            if match.group(2):
                found[last] = match.group(2).strip()
        else:
            above = []
    return found


def text(config, config_name: str, flags_help: str) -> str:
    with open(os.path.join(config_files.directory(), "default.py")) as f:
        about = comments(f.read())
    lines = ["usage: python -m resnet_jax.main --config=NAME|FILE.py[:ARG] --workdir=DIR "
             "[--config.SECTION.FIELD=VALUE ...]", "", flags_help.rstrip(), "",
             f"Shipped configs (--config=NAME): {', '.join(config_files.shipped())}", "",
             f"Config fields, with their values in {config_name}; set any with "
             "--config.SECTION.FIELD=VALUE:"]
    top = [(key, value) for key, value in config.items() if not hasattr(value, "items")]
    sections = [(key, value) for key, value in config.items() if hasattr(value, "items")]
    for key, value in top:
        lines.append(_line(key, value, about.get(key)))
    for section, fields in sections:
        lines.append(f"{section}:")
        for key, value in fields.items():
            lines.append(_line(f"  {key}", value, about.get(f"{section}.{key}")))
    return "\n".join(lines) + "\n"


def _line(key: str, value, comment: str | None) -> str:
    entry = f"{key} = {value!r}"
    return f"{entry:<40} {comment}" if comment else entry
