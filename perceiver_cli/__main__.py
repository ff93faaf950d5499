"""`python -m perceiver_cli` runs the `perceiver` command line."""

from .cli.main import main

if __name__ == "__main__":
    main()
