"""JAX's persistent compilation cache, on by default for jaxseg's jobs and benchmarks.

A UNETR step takes 10-40 s to compile; with the cache, a second run of the same config (and
each of table1's identical fine-tuning runs) loads the compiled program instead. The folder is
``$JAXSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxseg/xla``, else ``~/.cache/jaxseg/xla``;
entries are keyed by program, devices and jax version, so one folder serves every run.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    if os.environ.get("JAXSEG_CACHE_DIR"):
        return Path(os.environ["JAXSEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxseg" / "xla"


def enable_compilation_cache(where: str | os.PathLike | None = "auto", min_compile_s: float = 0.5) -> Path | None:
    """Turn the cache on: ``where`` is ``'auto'`` (the default folder), a folder, or ``'off'`` /
    ``None`` / ``''`` (leave it off). Programs that compile in under ``min_compile_s`` are not
    stored. Returns the folder in use, or None."""
    import jax

    if where in (None, "", "off", "none", "false"):
        return None
    path = default_cache_dir() if where == "auto" else Path(where).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"compilation cache folder {path} cannot be created: {e}; "
                           "pass --compilation_cache=off or another folder") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    return path
