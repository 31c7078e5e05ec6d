"""The pure core: the model and its directory's files, the optimizer, params, the quality filters,
scrub, dedupe and scoring.
No servers, no tracking, no subprocesses; it imports nothing above it."""
