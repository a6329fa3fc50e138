"""`python -m detkit` is the `detkit` command."""
from .cli import main

raise SystemExit(main())
