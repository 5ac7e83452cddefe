"""The one place jaxseg reaches into JAX's private modules (``jax._src.distributed``), for what
JAX has no public API for: the coordination-service client that ``jax.distributed.initialize``
makes (a key-value store, and barriers with timeouts). ``tests/distributed/test_distributed.py`` fails
loudly when a JAX release changes it."""

from __future__ import annotations


def client():
    """The coordination-service client of this process, or None before ``jax.distributed.initialize``."""
    from jax._src import distributed

    return distributed.global_state.client
