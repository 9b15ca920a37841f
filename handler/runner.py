"""The model runner: executes the scheduler's plans on the device.

The engine loop (engine.py) hands it the windows to start (`WindowJob`s from scheduler.py:
encode them, or reuse a kept encoder output, detect languages, build prompts, join the
decode batch), asks it to decode the running windows some tokens further (returning those
that ended) and to time the words of committed windows. It knows nothing of streams,
requests or fairness; it owns the tensors: the requests' log-mels, the encoder outputs of
the windows in flight, and the decode batch (decoding.py). `reset` drops the batch (after
a failure) and hands back the ids of its windows. Also here: the device layout of the
model and the GPU window budget.
"""

import copy
import time
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from whisper.audio import FRAMES_PER_SECOND, N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from whisper.model import disable_sdpa
from whisper.timing import add_word_timestamps, dtw
from whisper.tokenizer import LANGUAGES, get_tokenizer

from decoding import CUDA_ROW_BUCKETS, PREFILL_ROWS, DecodeBatch, DecodedWindow, TokenRules


ENCODER_BACKENDS = ("torch", "onnxruntime")  # onnxruntime: cpu, fp32 (onnx_encoder.py)


MAX_GPU_WINDOW_BUDGET = 1024  # windows per step on a GPU with the memory for them
MAX_ENCODER_BATCH = 256  # windows per encoder call (its activations grow with the call)


def window_bytes(dims) -> int:
    """Device bytes one window in flight takes on a GPU (fp16): its rows of the decode batch
    (the cross-attention keys/values of every decoder layer, the fixed self-attention
    cache), the encoder output kept for a retry, the encoder's widest activations (the MLP,
    4x the width), and a step's fp32 logits with their copies and the int64 noise of
    sampling."""
    cross = 2 * dims.n_text_layer * dims.n_audio_ctx * dims.n_text_state * 2
    self_cache = 2 * dims.n_text_layer * dims.n_text_ctx * dims.n_text_state * 2
    features = dims.n_audio_ctx * dims.n_audio_state * 2
    encoder = 3 * dims.n_audio_ctx * 4 * dims.n_audio_state * 2
    step = 4 * dims.n_vocab * 4 + 3 * dims.n_vocab * 8
    return cross + self_cache + features + encoder + step


def join_bytes(dims) -> int:
    """Device bytes a joining window takes beyond its rows while it is prefilled (at most
    PREFILL_ROWS at a time): its cross-attention keys/values, computed before they are
    copied into the batch, and its prefill attention maps (fp32 scores, their softmax and
    the fp16 copy, for the longest prompt, over itself and the audio)."""
    cross = 2 * dims.n_text_layer * dims.n_audio_ctx * dims.n_text_state * 2
    prompt = dims.n_text_ctx // 2 + 3  # at most half the context of previous text, then the SOT sequence
    return cross + dims.n_text_head * prompt * (prompt + dims.n_audio_ctx) * (4 + 4 + 2)


def gpu_window_budget(device, dims, mel_seconds: float = 0.0, fraction: float = 0.5,
                      free_bytes: Optional[int] = None) -> int:
    """Windows per step that fit in `fraction` of the GPU memory still free (`free_bytes`,
    else asked of the device), after the fp32 log-mels of `mel_seconds` of admitted audio
    (whole requests stay on the device), at `window_bytes` each with the transient
    `join_bytes` of the windows prefilled together, rounded down to a row bucket of the
    decode step (the batch's buffers are a whole bucket)."""
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    room = fraction * free_bytes - mels_bytes(dims, mel_seconds)
    window, join = window_bytes(dims), join_bytes(dims)
    fits = room // (window + join)  # every window joining at once
    if fits > PREFILL_ROWS:  # joins are prefilled PREFILL_ROWS at a time
        fits = (room - PREFILL_ROWS * join) // window
    fits = int(min(MAX_GPU_WINDOW_BUDGET, fits))
    return max([1] + [b for b in CUDA_ROW_BUCKETS if b <= fits])


def mels_bytes(dims, seconds: float) -> float:
    """The fp32 log-mels of `seconds` of audio on the device."""
    return seconds * FRAMES_PER_SECOND * dims.n_mels * 4


def prepare_model(model, device: str, dtype: torch.dtype, low_precision_layernorm: bool = False):
    """The model on `device` in `dtype`; a reduced-precision cpu model is a copy, so the
    loaded one stays fp32. Its LayerNorms keep fp32 weights (so no weight is cast per call)
    and whisper's cast of their input to fp32 and back, unless `low_precision_layernorm`:
    then they run in `dtype` directly (torch's kernel still sums in fp32), without the two
    copies per LayerNorm and step."""
    model = model.to(device).eval()
    if dtype != torch.float32:
        if not str(device).startswith("cuda"):
            model = copy.deepcopy(model)
        model.to(dtype)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                if low_precision_layernorm:
                    module.forward = partial(torch.nn.LayerNorm.forward, module)
                else:
                    module.float()
    return model


ALIGN_GROUP = 16  # windows per decoder pass of word alignment (their logits and attention maps fit)


@dataclass
class AlignmentWindow:
    """One window's segments to time (in place), as whisper.timing.add_word_timestamps
    takes them; features: (n_audio_ctx, n_audio_state), the window's encoder output."""

    segments: List[dict]
    features: torch.Tensor
    num_frames: int
    tokenizer: object
    last_speech_timestamp: float


class _Replayed:
    """The model as whisper.timing's find_alignment sees it for one window whose decoder
    pass was already run with others: calling it hands the hooks find_alignment installs
    on the cross-attention layers that window's attention maps, and returns its logits.
    So the alignment rules (median filter, DTW, word merging, the long-word heuristics)
    stay whisper's own, while the device work is one pass for many windows."""

    def __init__(self, model, logits: torch.Tensor, qks: dict):
        """qks: layer -> (its alignment heads' numbers, their maps (heads, tokens, frames)),
        for the layers that hold alignment heads; find_alignment reads no other map."""
        # on the host: find_alignment reads the heads one by one (on the device, a sync each)
        self.dims, self.alignment_heads, self.device = model.dims, model.alignment_heads.cpu(), model.device
        self.logits, self.qks, self.hooks = logits, qks, {}
        self.decoder = SimpleNamespace(blocks=[
            SimpleNamespace(cross_attn=SimpleNamespace(register_forward_hook=partial(self._hook, i)))
            for i in range(model.dims.n_text_layer)])

    def _hook(self, layer, hook):
        self.hooks[layer] = hook
        return SimpleNamespace(remove=lambda: self.hooks.pop(layer, None))

    def __call__(self, _audio_features, tokens):
        if tokens.shape[-1] != self.logits.shape[0]:
            raise RuntimeError(f"alignment replay: {tokens.shape[-1]} tokens, {self.logits.shape[0]} prepared")
        for layer, hook in list(self.hooks.items()):
            maps = torch.zeros(0)  # a layer without alignment heads: never read
            if layer in self.qks:
                heads, part = self.qks[layer]
                maps = part.new_zeros(self.dims.n_text_head, *part.shape[1:])
                maps[heads] = part
            hook(None, None, (None, maps[None]))
        return self.logits[None]


@dataclass(frozen=True)
class StartOutput:
    """What starting a plan's windows did."""

    languages: Dict[int, str]  # window id -> the language it is decoded in
    encoded: int  # windows that went through the encoder (the others reused a kept output)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelRunner:
    """Runs one Whisper model on one device for the engine: the part of the batched engine
    that touches torch (with decoding.py and onnx_encoder.py beneath it). It holds the requests' log-mels (by Request.serial), the encoder
    outputs of the windows in flight (by window id) and the decode batch.

        runner.add_audio(serial, audio)      # the log-mel, computed in the caller's thread
        runner.start(jobs) -> StartOutput    # encode, detect languages, build prompts, join
        runner.decode(tokens) -> [(window id, DecodedWindow)]   # rows that ended
        runner.time_words(jobs) -> [segments with words]
        runner.release(windows=..., requests=...)
    """

    def __init__(self, model, device: str = "cpu", precision: Union[str, torch.dtype] = torch.float32,
                 encoder_batch: int = 2, max_new_tokens: int = 224,
                 timing_syncs: bool = False, encoder_backend: str = "torch",
                 low_precision_layernorm: Optional[bool] = None, cuda_graphs: bool = True):
        dtype = PRECISIONS[precision] if isinstance(precision, str) else precision
        self.device = torch.device(device)
        self.dtype = dtype
        self.cuda_graphs = cuda_graphs
        if low_precision_layernorm is None:  # fp16: as exact (tests/unit/test_decoding.py)
            low_precision_layernorm = dtype == torch.float16
        self.model = prepare_model(model, device, dtype, low_precision_layernorm)
        if encoder_backend not in ENCODER_BACKENDS:
            raise ValueError(f"encoder backend must be one of {ENCODER_BACKENDS}, not {encoder_backend!r}")
        if encoder_backend == "onnxruntime" and self.device.type != "cpu":
            raise ValueError("the onnxruntime encoder runs on cpu only")
        self.encoder_backend = encoder_backend
        self._encoder = self.model.encoder
        if encoder_backend == "onnxruntime":
            from onnx_encoder import OnnxEncoder

            self._encoder = OnnxEncoder(self.model.encoder, torch.get_num_threads())
        self.dims = self.model.dims
        self.n_text_ctx = self.dims.n_text_ctx
        self.is_multilingual = self.model.is_multilingual
        self.encoder_batch = encoder_batch
        self.max_new_tokens = max_new_tokens
        # wait for the device in clock() (exact phase times on cuda, one sync per phase)
        self.timing_syncs = timing_syncs
        self.languages = tuple(LANGUAGES)[: self.model.num_languages] if self.model.is_multilingual else ("en",)
        self._tokenizers = {}
        self.rules = TokenRules(self.tokenizer("en", "transcribe"), self.dims.n_vocab,
                                self.dims.n_audio_ctx, self.device)
        self.batch = self._new_batch()
        self._mels: Dict[int, torch.Tensor] = {}  # Request.serial -> log-mel (added from callers' threads)
        self._features: Dict[int, torch.Tensor] = {}  # window id -> encoder output
        # layer -> its alignment heads (whisper's cross-attention heads that follow the words)
        self._alignment_heads = {}
        for layer, head in self.model.alignment_heads.indices().T.tolist():
            self._alignment_heads.setdefault(layer, []).append(head)

    def _new_batch(self) -> DecodeBatch:
        # the tokenizer only turns tokens into text: the BPE is the same for every language
        return DecodeBatch(self.model, self.tokenizer("en", "transcribe"), self.rules, self.max_new_tokens,
                           cuda_graphs=self.cuda_graphs)

    def tokenizer(self, language: Optional[str], task: str):
        model = self.model
        key = (language, task) if model.is_multilingual else ("en", "transcribe")
        if key not in self._tokenizers:
            self._tokenizers[key] = get_tokenizer(
                model.is_multilingual, num_languages=model.num_languages, language=key[0], task=key[1]
            )
        return self._tokenizers[key]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def mel(self, audio: np.ndarray) -> torch.Tensor:
        """(n_mels, frames + N_FRAMES): like transcribe, the log-mel of the whole audio plus
        30 s of zeros, sliced at each window's seek."""
        return log_mel_spectrogram(torch.from_numpy(audio).to(self.device), self.dims.n_mels, padding=N_SAMPLES)

    @torch.no_grad()
    def encode(self, mels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Windows (each (n_mels, <= N_FRAMES), padded here) -> (n, n_audio_ctx, n_audio_state),
        `encoder_batch` windows per encoder call (on CPU larger calls are slower per window:
        the attention maps leave the cache)."""
        mel = torch.stack([pad_or_trim(m, N_FRAMES) for m in mels]).to(self.dtype)
        step = self.encoder_batch
        return torch.cat([self._encoder(mel[i: i + step]) for i in range(0, len(mel), step)]).to(self.dtype)

    @torch.no_grad()
    def detect_language(self, features: torch.Tensor, candidates: Sequence[Sequence[str]]) -> List[str]:
        """For each window's encoder output, the most probable of its candidate languages
        (an empty sequence: all of the model's)."""
        _, probs = self.model.detect_language(features, self.tokenizer(None, "transcribe"))
        return [max(allowed or p, key=p.get) for p, allowed in zip(probs, candidates)]

    # ------------------------------------------------------------------ the engine's calls

    def add_audio(self, serial: int, audio: np.ndarray) -> int:
        """Keep the log-mel of a request's audio (float32 16 kHz samples) for its windows;
        returns its length in mel frames (the audio's plus N_FRAMES of padding)."""
        mel = self.mel(audio)
        self._mels[serial] = mel
        return mel.shape[-1]

    def release(self, windows: Sequence[int] = (), requests: Sequence[int] = ()) -> None:
        """Forget the encoder outputs of windows that committed or failed, and the log-mels
        of requests that are done."""
        for window_id in windows:
            self._features.pop(window_id, None)
        for serial in requests:
            self._mels.pop(serial, None)

    @torch.no_grad()
    def start(self, jobs: Sequence) -> StartOutput:
        """Encode the jobs' windows (or reuse the encoder outputs kept for windows going round
        again), detect the language of requests that gave none (each request's first window
        decides), and add the windows to the decode batch after their prompts (whisper's
        initial tokens: <|startofprev|> and the previous text, then the SOT sequence), each at
        its temperature, a sampled one drawing its noise from its seed."""
        try:
            new = [job for job in jobs if job.window_id not in self._features]
            mels = [self._mels[job.request][:, job.seek: job.seek + job.size] for job in new]
            encoded = iter(self.encode(mels) if new else [])
            features = torch.stack([self._features[job.window_id] if job.window_id in self._features
                                    else next(encoded) for job in jobs])
            languages = [job.language for job in jobs]
            unknown = [i for i, lang in enumerate(languages) if lang is None]
            if unknown:
                detected = self.detect_language(features[unknown], [jobs[i].languages for i in unknown])
                first: Dict[int, str] = {}
                for i, lang in zip(unknown, detected):  # the request's first row decides
                    languages[i] = first.setdefault(jobs[i].request, lang)
            initial = []
            for job, lang in zip(jobs, languages):
                tokenizer = self.tokenizer(lang, job.task)
                sot = tokenizer.sot_sequence if job.timestamps else tokenizer.sot_sequence_including_notimestamps
                initial.append(([tokenizer.sot_prev, *job.prompt] if job.prompt else []) + list(sot))
            self.batch.add(features, initial, [job.temperature for job in jobs], [job.seed for job in jobs],
                           [job.window_id for job in jobs])
        except BaseException:
            self._after_failure()
            raise
        for job, window_features in zip(jobs, features):
            self._features[job.window_id] = window_features
        return StartOutput({job.window_id: lang for job, lang in zip(jobs, languages)}, len(new))

    def decode(self, tokens: int) -> List[Tuple[int, DecodedWindow]]:
        """Decode every running window up to `tokens` further; (window id, result) of those
        that ended, which leave the batch. On an error the caller resets the batch."""
        return self.batch.step(tokens)

    @property
    def decoding(self) -> List[int]:
        """Ids of the windows in the decode batch."""
        return list(self.batch.tags)

    def bind_thread(self) -> None:
        """Make this runner's device the current one of the calling thread (the engine's
        loop): CUDA graphs capture only the current device's work."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def reset(self) -> List[int]:
        """Drop the decode batch's rows (after a failure), keeping its buffers and CUDA
        graphs; returns the ids of the windows it held."""
        tags = self.batch.clear()
        self._after_failure()
        return tags

    def capture_graphs(self, rows: int) -> int:
        """cuda: record the decode step of every shape up to `rows` rows as CUDA graphs, at
        start-up (decoding.DecodeBatch.capture_graphs); returns the graphs held."""
        if self.device.type != "cuda" or not self.cuda_graphs:
            return 0
        return self.batch.capture_graphs(rows, self.dtype)

    @property
    def graph_counts(self) -> Dict[str, int]:
        """Token steps replayed from CUDA graphs, run eagerly, and failed captures."""
        return dict(self.batch.counts, graphs_held=len(self.batch.graphs))

    def reset_counts(self) -> None:
        self.batch.counts.update(graph_steps=0, eager_steps=0)

    def _after_failure(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def time_words(self, jobs: Sequence) -> List[List[dict]]:
        """Word timestamps of the jobs' segments (outputs.WordTimingJob): per job a copy of
        its segments with whisper.timing's `words` added and edges moved."""
        windows = [AlignmentWindow([dict(s) for s in job.segments], self._features[job.window_id], job.num_frames,
                                   self.tokenizer(job.language, job.task), job.last_speech_timestamp)
                   for job in jobs]
        self.add_word_timestamps(windows)
        return [w.segments for w in windows]

    @torch.no_grad()
    def add_word_timestamps(self, windows: Sequence[AlignmentWindow]) -> None:
        """Word timing of the windows' segments, in place: the decoder runs once per
        ALIGN_GROUP windows (right-padded token rows; the causal mask keeps each row's
        maps its own) and whisper.timing times each window's words from its part."""
        texts = [[t for seg in w.segments for t in seg["tokens"] if t < w.tokenizer.eot] for w in windows]
        rows = [([*w.tokenizer.sot_sequence, w.tokenizer.no_timestamps, *text, w.tokenizer.eot], w)
                for w, text in zip(windows, texts) if text]
        for start in range(0, len(rows), ALIGN_GROUP):
            group = rows[start: start + ALIGN_GROUP]
            width = max(len(tokens) for tokens, _ in group)
            tokens = torch.tensor([tokens + [w.tokenizer.eot] * (width - len(tokens)) for tokens, w in group],
                                  device=self.device)
            features = torch.stack([w.features for _, w in group])
            qks = {}  # layer -> (rows, its alignment heads, tokens, frames): only what DTW reads
            hooks = [self.model.decoder.blocks[layer].cross_attn.register_forward_hook(
                lambda _, ins, outs, layer=layer, heads=heads: qks.__setitem__(layer, outs[-1][:, heads]))
                for layer, heads in self._alignment_heads.items()]
            try:
                with disable_sdpa():
                    logits = self.model.decoder(tokens, features)
            finally:
                for hook in hooks:
                    hook.remove()
            for k, (row_tokens, w) in enumerate(group):
                n = len(row_tokens)
                replayed = _Replayed(self.model, logits[k, :n], {
                    layer: (self._alignment_heads[layer], qk[k, :, :n]) for layer, qk in qks.items()})
                add_word_timestamps(segments=w.segments, model=replayed, tokenizer=w.tokenizer, mel=w.features,
                                    num_frames=w.num_frames, last_speech_timestamp=w.last_speech_timestamp)
        for w, text in zip(windows, texts):
            if not text:  # nothing to align: whisper's rules still give each segment its words list
                add_word_timestamps(segments=w.segments, model=None, tokenizer=w.tokenizer, mel=w.features,
                                    num_frames=w.num_frames, last_speech_timestamp=w.last_speech_timestamp)

    def warm_kernels(self) -> None:
        """numba (cpu) or triton (cuda) compile the DTW of word timestamps on first use."""
        dtw(torch.randn(20, 40, device=self.device))

    def clock(self) -> float:
        """Wall time; with timing_syncs, after the device has finished its queued work (else
        on cuda a phase's time counts the queued work of the phase before it)."""
        if self.timing_syncs:
            self.sync()
        return time.perf_counter()
