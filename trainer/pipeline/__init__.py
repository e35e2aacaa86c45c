"""What runs in the command-line process: Ray Train jobs, the speedrun, sweeps, the report, the progress bar."""
