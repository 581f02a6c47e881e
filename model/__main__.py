"""`python -m model init|score`: make a random checkpoint, or score a text with one."""

from model.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
