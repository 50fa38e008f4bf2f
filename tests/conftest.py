import sys
from pathlib import Path

# tests/fixtures is imported as a top-level package by the test modules.
sys.path.insert(0, str(Path(__file__).parent))
