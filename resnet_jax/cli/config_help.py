"""`--help` of the main job: its flags, the shipped configs, and every config field with its value
and a line about it. The lines are the comments of configs/default.py, where each field is
defined once; the values are those of the config the command names (the quickstart without one).
"""

import os
import re

from resnet_jax.cli import config_files

HELP = ("--help", "-h", "--helpshort", "--helpfull", "-?")  # what asks a command for its help
_SECTION = re.compile(r"^\s*config\.(\w+)\s*=\s*ml_collections\.ConfigDict")
_TOP_FIELD = re.compile(r"^\s*config\.(\w+)\s*=")
_FIELD = re.compile(r"^\s+(\w+)=[^#]*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s*#\s*(.*)$")


def comments(source: str) -> dict[str, str]:
    """"section.field" (or "field" at the top) -> its comment in a config file's source: the comment
    lines just above it (at its own indentation or less), then the text after it on its line and
    the comment lines, indented deeper than the field, that continue that text."""
    found, section, last, above, indent = {}, "", None, [], 0
    for line in source.splitlines():
        depth = len(line) - len(line.lstrip())
        if comment := _COMMENT.match(line):
            if last and depth > indent:  # continues the comment after the field above
                found[last] = f"{found.get(last, '')} {comment.group(1)}".strip()
            else:  # about the field below
                last = None
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
            last, indent = f"{section}.{match.group(1)}", depth
            text = " ".join(above + [(match.group(2) or "").strip()]).strip()
            if text:
                found[last] = text
            above = []
        else:
            above = []
    return found


def text(config, config_name: str, flags_help: str,
         arguments: dict[str, tuple[str, str]] | None = None) -> str:
    """The help: usage, `flags_help`, the shipped configs, the arguments `config_name` takes
    (its ARGUMENTS: key -> (default, what it takes)), and every field of `config`."""
    with open(os.path.join(config_files.directory(), "default.py")) as f:
        about = comments(f.read())
    shipped = config_files.shipped()
    sweeps = [name for name in shipped if config_files.is_sweep(name)]
    configs = [name for name in shipped if name not in sweeps]
    lines = ["usage: python -m resnet_jax.main --config=NAME|FILE.py[:ARG] --workdir=DIR "
             "[--config.SECTION.FIELD=VALUE ...]", "", flags_help.rstrip(), "",
             f"Shipped configs (--config=NAME): {', '.join(configs)}",
             f"Shipped sweeps (python -m launch.sweep --sweep=NAME): {', '.join(sweeps)}", ""]
    if arguments:
        lines.append(f"Arguments of {config_name} (--config=NAME:KEY=VALUE,...), with their "
                     f"defaults:")
        lines += [f"{f'  {key}={default}':<40} {about}" for key, (default, about) in arguments.items()]
        lines.append("")
    lines += [f"Config fields, with their values in {config_name}; set any with "
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
