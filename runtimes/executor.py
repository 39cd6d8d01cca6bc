"""Runs a package's stage graph: feeds flow through the stages in manifest order."""

from __future__ import annotations

import numpy as np
from edgec.runtimes.backends import Backend, Feeds
from edgec.runtimes.manifest import Manifest

from edgec.errors import PackageError


def execute(manifest: Manifest, backend: Backend, feeds: Feeds) -> Feeds:
    """Run every stage in order; each reads model inputs or earlier stages' outputs by name.

    Stages are listed in topological order in the manifest, so one pass suffices.
    """
    tensors: dict[str, np.ndarray] = dict(feeds)
    for stage in manifest.stages:
        missing = [name for name in stage.inputs if name not in tensors]
        if missing:
            raise PackageError(
                f"stage {stage.name!r} needs {missing}, which no earlier stage makes"
            )
        tensors.update(backend.run_stage(stage.name, {n: tensors[n] for n in stage.inputs}))
    return {out.name: tensors[out.name] for out in manifest.outputs}
