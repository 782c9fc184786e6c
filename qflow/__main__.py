"""``python -m qflow``: the same as the ``qflow`` command."""

from ._cli import main

if __name__ == "__main__":
    main()
