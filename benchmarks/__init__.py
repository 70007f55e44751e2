"""Benchmark scripts: they print figures; nothing imports them."""
