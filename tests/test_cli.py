import subprocess
import sys

from swarmnode import __version__


def test_version_flag() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "swarmnode.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"swarmnode {__version__}"
    assert __version__ != "0.0.0+unknown"
