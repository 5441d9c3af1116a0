"""The command line: config files by name or path (`config_files`) and `--help` with every
config field (`config_help`)."""
