"""KServe 0.21 Python model server with a custom model class wrapping ONNX Runtime (benchmark only).

Run in its own virtual environment: `python kserve_model.py --model_name mlp --model_path m.onnx --http_port P`.
"""

from __future__ import annotations

import argparse
import os
import uuid

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server


class OnnxModel(Model):
    """V2 in, ONNX Runtime, V2 out."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.path = path
        self.load()

    def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("KILN_BENCH_THREADS", "0"))  # run.py: the same as Kiln's
        self.session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.ready = True
        return self.ready

    def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
        x = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        results = self.session.run(self.output_names, {self.input_name: x})
        outputs = []
        for name, arr in zip(self.output_names, results, strict=True):
            out = InferOutput(name=name, shape=list(arr.shape), datatype="FP32")
            out.set_data_from_numpy(arr, binary_data=False)
            outputs.append(out)
        return InferResponse(model_name=self.name, infer_outputs=outputs, response_id=payload.id or str(uuid.uuid4()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_path", required=True)
    args, _ = parser.parse_known_args()
    model = OnnxModel(args.model_name, args.model_path)
    ModelServer().start([model])
