"""The benchmarks' command lines: bad input is one line, not argparse's usage text."""

import argparse


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise SystemExit(f"error: {message}")
