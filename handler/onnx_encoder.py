"""Whisper's audio encoder under ONNX Runtime, for CPUs without native bf16.

    encoder = OnnxEncoder(model.encoder, threads=2)
    features = encoder(mel)          # (n, n_mels, 3000) -> (n, n_audio_ctx, n_audio_state), fp32

The model's own encoder is exported once when the worker starts (torch.onnx.export, a few
seconds for base) into a temporary file that is deleted as soon as onnxruntime has read it;
the weights are the loaded checkpoint's, so nothing new is downloaded or stored. On the
2-core AVX-512 CPU of docs/benchmarks.md onnxruntime's fp32 encoder took 0.29 s per 30 s
window of base against torch's 0.51 s (torch.compile: 0.57 s), with outputs within 3e-4 of
torch's. The decoder stays in torch (handler/decoding.py): its steps join and leave rows,
which a fixed ONNX graph does not.
"""

import copy
import os
import tempfile
import warnings

import numpy as np
import torch


class OnnxEncoder:
    """A fp32 copy of `encoder` (whisper's AudioEncoder) running in an onnxruntime session
    with `threads` intra-op threads."""

    def __init__(self, encoder: torch.nn.Module, threads: int):
        import onnxruntime

        if next(encoder.parameters()).dtype != torch.float32:
            encoder = copy.deepcopy(encoder).float()  # the export's copy; the model stays as loaded
        n_mels = encoder.conv1.in_channels
        n_frames = 2 * encoder.positional_embedding.shape[0]  # two frames per position (conv2 strides 2)
        with tempfile.TemporaryDirectory(prefix="whisper-encoder-") as tmp:
            path = os.path.join(tmp, "encoder.onnx")
            with warnings.catch_warnings():  # the exporter's notes on whisper's shape assert
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    encoder.eval(), (torch.zeros(1, n_mels, n_frames),), path, input_names=["mel"],
                    output_names=["features"], dynamic_axes={"mel": {0: "n"}, "features": {0: "n"}},
                    opset_version=17, dynamo=False,
                )
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            # no busy-waiting between calls: the decoder needs these cores meanwhile
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = onnxruntime.InferenceSession(path, sess_options=options,
                                                        providers=["CPUExecutionProvider"])

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        """(n, n_mels, n_frames) -> (n, n_audio_ctx, n_audio_state), fp32 on the CPU."""
        mel = np.ascontiguousarray(mel.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {"mel": mel})[0])
