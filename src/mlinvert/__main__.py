"""``python -m mlinvert``: the same command line as the ``mlinvert`` script."""

from mlinvert.cli.main import main

if __name__ == "__main__":
    main()
