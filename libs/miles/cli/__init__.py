"""The `miles` command line: one module per command (run, serve, status, report, plan)."""
