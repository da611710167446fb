"""`python -m verify`: verify a converted checkpoint against a Caffe reference (see verify/cli.py)."""

from verify.cli import main

raise SystemExit(main())
