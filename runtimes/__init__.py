"""The device side: load and verify packages, run their stages, aggregate, serve.

Never imports torch or transformers: a device installs ``edgec[device]`` only.
"""

from edgec.runtimes.manifest import FORMAT_VERSION, Manifest
from edgec.runtimes.package import Package, read_package
from edgec.runtimes.runtime import Classification, Runtime, check_feeds, load_package

__all__ = [
    "FORMAT_VERSION",
    "Classification",
    "Manifest",
    "Package",
    "Runtime",
    "check_feeds",
    "load_package",
    "read_package",
]
