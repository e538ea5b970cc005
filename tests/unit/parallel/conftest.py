import sys
from pathlib import Path

# The layout harness is imported by name, and by the spawned worker processes.
sys.path.insert(0, str(Path(__file__).resolve().parent))
