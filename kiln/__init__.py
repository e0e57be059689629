"""Kiln: train TensorFlow models and serve them as ONNX on Kubernetes, declaratively."""

GROUP = "kiln.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
DEFAULT_OUTPUT_DIR = "kiln-output"
"""Folder name for outputs when a TrainingJob names no `spec.output.uri` (under the working directory,
or /tmp in a pod) and for `kiln run`'s logs: one name everywhere."""

__version__ = "0.1.0"
