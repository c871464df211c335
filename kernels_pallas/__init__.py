"""Pallas kernels (flash and paged attention), each beside a plain-JAX reference."""
