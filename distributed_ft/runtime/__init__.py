"""Where the loop runs: rank, world size, device, collectives, reporting."""
