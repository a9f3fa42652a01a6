"""`python -m gateway`: the same as `brainscan-server`."""

from gateway.cli import main

raise SystemExit(main())
