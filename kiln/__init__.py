"""Kiln: train TensorFlow models and serve them as ONNX on Kubernetes, declaratively."""

GROUP = "kiln.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

__version__ = "0.1.0"
