"""``python -m sidenet``: the same command line as the ``sidenet`` script."""

from sidenet.cli import main

if __name__ == "__main__":
    main()
