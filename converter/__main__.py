"""`python -m converter`: the conversion command line (see converter/cli.py)."""

from converter.cli import main

raise SystemExit(main())
