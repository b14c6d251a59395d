"""Fault probes: bad settings, storage that fails or never answers, bad data files
and teachers that cannot be reached. Each test reproduces one probe: it failed (or hung) on the
code before the hardening and must pass after it."""
