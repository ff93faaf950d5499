"""`python -m perceiver_cli.bench` runs the core benchmark, as `perceiver bench` does."""

from ..cli.bench import bench_command

if __name__ == "__main__":
    import typer

    typer.run(bench_command)
