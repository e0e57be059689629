"""Helpers shared by the test modules: plain functions, classes and constants, never fixtures.

Fixtures stay in the conftest.py files (which import what they need from here); test modules import
helpers from `support.*` (tests/conftest.py puts tests/ on sys.path). Modules by tier:

- `support.cluster`: the real operator as a child process and throwaway namespaces (live tier)
- `support.chart`: the Helm chart's location and `--set-json` arguments (helm tier)
- `support.server`: `kiln serve` processes on 127.0.0.1 and the ONNX Runtime oracle (server tier)
- `support.models`: small ONNX models built with onnx.helper (server tier)
- `support.trainer`: tiny datasets, TrainingJob manifests and `kiln train` runs (training tier)
- `support.kstatus`: the kstatus rules and a recorder of every status the operator writes (live tier)
- `support.argocd`: Kiln's Argo CD Lua health checks run on Lua 5.1 (lupa)
- `support.progress_server`: a stand-in for the API server that records the trainer's progress PATCHes

tests/testenv.py (the control plane, also run by hand as a script) and tests/kubelet.py stay where they are.
"""
