"""speedloop's experiment engine: workspace, runner, judge, ledger and command line."""
