"""``python -m falemu --port N``: run the fal emulator in the foreground."""

from falemu.server import cli_main

raise SystemExit(cli_main())
