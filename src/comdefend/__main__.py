"""``python -m comdefend``: the same command line as ``comdefend``."""

from comdefend.cli import main

if __name__ == "__main__":
    main()
