import os
import sys
import tempfile
from pathlib import Path

# tests/fixtures is imported as a top-level package by the test modules.
sys.path.insert(0, str(Path(__file__).parent))

# torchvision (the video processors' parity reference) comes from .test-deps through this
# loader, before transformers looks for it (see the loader's docstring).
from fixtures.torchvision_loader import import_torchvision  # noqa: E402

import_torchvision()

# Never the user's ~/.cache/vlmc: compiled artifacts and the C kernels go to a cache of
# this test session (subprocesses inherit it). VLMC_TEST_CACHE names a folder to reuse
# between sessions instead (the kernels then build once).
os.environ["VLMC_CACHE"] = os.environ.get("VLMC_TEST_CACHE") or tempfile.mkdtemp(prefix="vlmc-test-cache-")
