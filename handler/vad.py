"""Voice activity detection: 16 kHz float32 audio -> speech spans in samples, with Silero VAD.

    vad = SileroVad()                                  # loads the model once; thread-safe
    spans = vad.speech(audio, VadOptions())            # [(start, end), ...] samples, sorted

The model is the ONNX file shipped inside the pinned `silero-vad` package
(silero_vad/data/silero_vad.onnx), run under onnxruntime on one thread with the recurrent
state passed explicitly, so one instance serves every request thread at once. Probabilities
become spans with the package's own `get_speech_timestamps_from_probs`.

Why ONNX and not the package's TorchScript model, measured on 60 s of LibriSpeech on the
2-core CI machine (under load): onnxruntime 0.25-0.33 s (about 0.5 % of real time); the
TorchScript model 0.83 s on one torch thread and 6.5 s on two, and it runs in torch's
thread pool, which the engine sizes for Whisper. A long file is cut into 30 s rows decoded
as one batch, each row first running over the 2 s before it to settle its recurrent state:
on 9.4 min of speech 2.4x faster on one thread (880x real time), with 38 of 17,692 frame
decisions moved and the same spans; on a GPU host, where the decoder runs thousands of
times faster than real time, the VAD of one long upload stays off the critical path.
Importing `silero_vad` sets torch's thread count to 1 (silero_vad/model.py): the count is
put back here.
"""

from dataclasses import dataclass
from importlib import resources
from typing import List, Tuple

import numpy as np

SAMPLE_RATE = 16000
FRAME = 512  # samples per Silero decision at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees before each frame
MODEL_FILE = "silero_vad.onnx"  # in the silero_vad.data package
ROW_FRAMES = 938  # frames (30 s) per row of a long file's batch
WARMUP_FRAMES = 63  # frames (2 s) each row runs over before its own, to settle its state
MAX_ROWS = 64  # rows per batch


@dataclass(frozen=True)
class VadOptions:
    """How probabilities become speech spans (Silero's own parameters; defaults as
    faster-whisper's, generous so a window is never skipped over a quiet word)."""

    threshold: float = 0.5  # a 32 ms frame with a speech probability at or above this is speech
    min_silence_duration_ms: int = 2000  # a pause shorter than this does not end a span
    speech_pad_ms: int = 400  # added before and after each span
    min_speech_duration_ms: int = 250  # shorter spans are dropped (clicks, knocks)
    max_speech_duration_s: float = float("inf")  # longer spans are cut (at their quietest frame)


def _speech_timestamps_from_probs():
    """silero_vad's span function, importing the package without its side effect on torch."""
    import torch

    threads = torch.get_num_threads()
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    torch.set_num_threads(threads)  # silero_vad/model.py sets it to 1 on import
    return get_speech_timestamps_from_probs


# window_mode "pauses": chunks are cut at pauses this long (faster-whisper's batched
# pipeline's), and no span is longer than a window
CHUNK_PAUSE_MS = 160
CHUNK_MAX_SPEECH_S = 30.0


class SileroVad:
    """Silero VAD's ONNX model under onnxruntime, one thread per call."""

    def __init__(self):
        import onnxruntime

        self._to_spans = _speech_timestamps_from_probs()
        self.model_path = str(resources.files("silero_vad.data").joinpath(MODEL_FILE))
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(self.model_path, sess_options=opts,
                                                    providers=["CPUExecutionProvider"])

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """(ceil(samples / 512),) float32: the speech probability of each 32 ms frame,
        the last frame padded with zeros (as silero_vad's get_speech_timestamps).

        Audio longer than one row (ROW_FRAMES) is cut into rows decoded side by side, in
        batches of up to MAX_ROWS: each row first runs over the WARMUP_FRAMES before it,
        whose outputs are dropped, so its recurrent state has settled when its own frames
        begin (docs/benchmarks.md: how many decisions that moves, and the speed-up)."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        frames = -(-len(audio) // FRAME)
        x = np.zeros(CONTEXT + frames * FRAME, dtype=np.float32)
        x[CONTEXT: CONTEXT + len(audio)] = audio
        starts = range(0, frames, ROW_FRAMES)
        probs = np.empty(frames, dtype=np.float32)
        for group in range(0, len(starts), MAX_ROWS):
            rows = starts[group: group + MAX_ROWS]
            firsts = [max(0, start - WARMUP_FRAMES) for start in rows]
            ends = [min(start + ROW_FRAMES, frames) for start in rows]
            out = self._run_rows(x, firsts, max(e - f for f, e in zip(firsts, ends)), frames)
            for r, (first, start, end) in enumerate(zip(firsts, rows, ends)):
                probs[start:end] = out[r, start - first: end - first]
        return probs

    def _run_rows(self, x: np.ndarray, firsts, length: int, frames: int) -> np.ndarray:
        """(rows, length) probabilities of `length` frames from each row's first frame,
        one model call per frame for all rows (rows past the audio see zeros)."""
        n = len(firsts)
        # row k of `inputs`: frame k with the CONTEXT samples before it; one row of zeros after
        inputs = np.lib.stride_tricks.sliding_window_view(x, CONTEXT + FRAME)[::FRAME]
        inputs = np.concatenate([inputs[:frames], np.zeros((1, CONTEXT + FRAME), np.float32)])
        firsts = np.asarray(firsts)
        state = np.zeros((2, n, 128), dtype=np.float32)
        sr = np.array(SAMPLE_RATE, dtype=np.int64)
        out = np.empty((n, length), dtype=np.float32)
        run = self.session.run
        for i in range(length):
            batch = inputs[np.minimum(firsts + i, frames)]
            probs, state = run(None, {"input": batch, "state": state, "sr": sr})
            out[:, i] = probs[:, 0]
        return out

    def speech(self, audio: np.ndarray, options: VadOptions = VadOptions()) -> List[Tuple[int, int]]:
        """Speech spans [(start, end), ...] in samples of `audio` (16 kHz), sorted and
        disjoint, padded by `speech_pad_ms` and clipped to the audio."""
        audio = np.asarray(audio, dtype=np.float32).reshape(-1)
        if len(audio) == 0:
            return []
        spans = self._to_spans(
            self.probabilities(audio).tolist(), sampling_rate=SAMPLE_RATE, threshold=options.threshold,
            min_speech_duration_ms=options.min_speech_duration_ms,
            min_silence_duration_ms=options.min_silence_duration_ms,
            max_speech_duration_s=options.max_speech_duration_s,
            speech_pad_ms=options.speech_pad_ms, audio_length_samples=len(audio),
        )
        return [(int(s["start"]), int(min(s["end"], len(audio)))) for s in spans if s["end"] > s["start"]]
