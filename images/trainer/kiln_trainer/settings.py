"""The trainer's environment contract as settings, read by the shared core's `kiln.settings`.

Why: the operator configures training pods only through `KILN_*` variables (see
`kiln_operator.trainingjob.render._env` and docs/trainer.md); reading them in one typed place, with the
same boolean and number parsing as the operator and the server, keeps the contract in one list. Read
at the moment of use (`TrainerSettings.from_env()`): `kiln run` sets KILN_PVC_ROOT around a training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kiln import settings as reader


@dataclass(frozen=True)
class TrainerSettings:
    """Every `KILN_*` variable the trainer reads; "" means unset."""

    spec: str = ""
    """KILN_SPEC: the TrainingJob file of `kiln train --in-cluster` (default /etc/kiln/trainingjob.yaml)."""
    trainingjob: str = ""
    """KILN_TRAININGJOB: the TrainingJob whose `status.progress` is patched."""
    namespace: str = ""
    """KILN_NAMESPACE: its namespace."""
    output_dir: str = ""
    """KILN_OUTPUT_DIR: the folder outputs are written to in a pod (a mounted claim, or /tmp)."""
    output_uri: str = ""
    """KILN_OUTPUT_URI: `spec.output.uri` as the operator passed it."""
    pvc_root: str = ""
    """KILN_PVC_ROOT: where `pvc://CLAIM/...` claims are mounted (default /kiln/pvc)."""
    termination_log: str = ""
    """KILN_TERMINATION_LOG: where the outcome JSON goes (default /dev/termination-log when writable)."""
    trial_index: str = ""
    """KILN_TRIAL_INDEX: with spec.tuning, run only this trial (0-based) and report it (parallel trials)."""
    tuning_best: str = ""
    """KILN_TUNING_BEST: with spec.tuning, train this trial (the operator's pick) for export, no search."""
    api_server: str = ""
    """KILN_API_SERVER: the API server for progress patches (default: the pod's service host)."""
    api_token_file: str = ""
    """KILN_API_TOKEN_FILE: bearer token file (default: the pod's service account token)."""
    api_ca_file: str = ""
    """KILN_API_CA_FILE: CA bundle of the API server (default: the service account's ca.crt)."""
    api_insecure: bool = False
    """KILN_API_INSECURE: skip TLS verification of the API server (test control planes only)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainerSettings:
        """The settings from `env` (default os.environ); raises kiln.settings.SettingsError on a bad value."""
        return reader.load(cls, env=env)
