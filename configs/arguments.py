"""The arguments of the parametrised configs: `--config=configs/FILE.py:key=value,...`."""


def parse(arg: str | None, spec: dict[str, tuple[str, str]], config_file: str) -> dict[str, str]:
    """The defaults of `spec` (a config's ARGUMENTS: key -> (default, what it takes), which
    `--help` prints) updated from "key=value,..."; an unknown key is an error naming the known
    ones."""
    args = {key: default for key, (default, _) in spec.items()}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in args:
            raise ValueError(f"{config_file} takes {', '.join(args)}; got {key!r}")
        args[key] = value
    return args


def boolean(args: dict[str, str], key: str, config_file: str) -> bool:
    # Strict: "true" or "yes" silently read as False would train the wrong network.
    if args[key] not in ("True", "False"):
        raise ValueError(f"{config_file}: {key} must be True or False; got {args[key]!r}")
    return args[key] == "True"


def integer(args: dict[str, str], key: str, config_file: str) -> int:
    try:
        return int(args[key])
    except ValueError:
        raise ValueError(f"{config_file}: {key} must be an integer; got {args[key]!r}") from None


def choice(args: dict[str, str], key: str, allowed, config_file: str) -> str:
    if args[key] not in allowed:
        raise ValueError(f"{config_file}: {key} must be one of {', '.join(allowed)}; got {args[key]!r}")
    return args[key]
