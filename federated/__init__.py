"""Federated recovery: devices improve a compressed model on data that never leaves them.

Built on Flower: ``simulate`` runs the ServerApp and ClientApps in Flower's simulation engine;
``edgec.federated.deploy`` runs them on a SuperLink and SuperNodes.
"""

from edgec.federated.apps import FederatedPlan, RunResult, simulate
from edgec.federated.local import LocalTraining
from edgec.federated.trainable import TrainableSet

from edgec.errors import FederatedError

__all__ = [
    "FederatedError",
    "FederatedPlan",
    "LocalTraining",
    "RunResult",
    "TrainableSet",
    "simulate",
]
