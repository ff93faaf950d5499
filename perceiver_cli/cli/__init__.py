"""The `perceiver` command line: thin typer commands over the library (see cli/main.py)."""
