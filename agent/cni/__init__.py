"""veil-cni: the chained CNI plugin (a static C shim on the node, agent/cni/shim/), the logic
it forwards to (plugin.py), the agent's socket for it (server.py) and the installer that puts
it on the node (install.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def shim_path() -> Path:
    """Where the built shim is: `make setup` puts it in the venv, the image in /usr/local
    (<python prefix>/lib/veil/veil-cni either way); $VEIL_CNI_SHIM overrides."""
    return Path(os.environ.get("VEIL_CNI_SHIM") or Path(sys.prefix) / "lib" / "veil" / "veil-cni")
