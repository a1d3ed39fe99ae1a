"""`python -m bench`: us against the other tools, side by side (bench/compare.py)."""

from bench.compare import main

raise SystemExit(main())
