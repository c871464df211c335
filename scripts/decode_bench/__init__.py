"""The serving benchmark's sections (scripts/bench_decode.py is the entry point): one module each."""
