"""The command line: the flags of the main job and evaluate with their one-line errors (`flags`),
config files by name or path (`config_files`) and `--help` with every config field
(`config_help`)."""
