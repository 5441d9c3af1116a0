"""The command line: every command's flags and their one-line errors (`flags`),
config files by name or path (`config_files`) and `--help` with every config field
(`config_help`)."""
