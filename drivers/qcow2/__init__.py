"""qcow2: the QEMU copy-on-write image format (versions 2 and 3)."""
from .driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
