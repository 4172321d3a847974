"""The command line: `main` parses and dispatches (progress on stderr, summaries on stdout); `demo` is the story."""
from pipeline.cli.main import EXIT_FAILURE, EXIT_INPUT, EXIT_USAGE, main

__all__ = ["EXIT_FAILURE", "EXIT_INPUT", "EXIT_USAGE", "main"]
