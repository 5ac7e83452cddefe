"""Session-wide setup: the suite uses jaxseg's own persistent compilation cache, in a fresh
folder shared with the entry points it runs as subprocesses, so that a program compiled by one
test (the tiny UNETR's init, fine-tuning step, evaluation forward...) loads in the next."""

import os
import tempfile

from jaxseg.compilation_cache import enable_compilation_cache

os.environ.setdefault("JAXSEG_CACHE_DIR", tempfile.mkdtemp(prefix="jaxseg-tests-xla-"))
enable_compilation_cache(os.environ["JAXSEG_CACHE_DIR"])
