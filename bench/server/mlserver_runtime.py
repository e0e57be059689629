"""MLServer 1.7.1 custom runtime wrapping ONNX Runtime, for the comparison benchmark only.

Loaded by `mlserver start` in its own virtual environment (bench/server/setup_envs.sh); the
model file comes from the model settings' `parameters.uri`.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntimeModel(MLModel):
    """V2 in, ONNX Runtime, V2 out: the smallest honest MLServer runtime."""

    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("KILN_BENCH_THREADS", "0"))  # run.py: the same as Kiln's
        self._session = ort.InferenceSession(self.settings.parameters.uri, opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        results = self._session.run(self._outputs, {self._input: x})
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(name, arr) for name, arr in zip(self._outputs, results, strict=True)],
        )
