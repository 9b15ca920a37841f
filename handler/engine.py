"""The batched transcription engine: many requests, one model, windows batched together.

Each request's audio becomes one or more *streams* (a long file is cut at pauses so it
can fill a batch by itself). Every engine step takes the current 30 s window of up to
`window_budget` active streams, computes their log-mel on the device, runs the encoder
once and decodes all windows together with timestamps (decoding.py). Each stream then
seeks to the end of its last complete segment exactly as `whisper.transcribe` does, so
words are neither cut nor repeated at window edges. Windows that fail whisper's checks
are decoded again at the next temperature as a smaller batch.

On CPU, short requests can be packed several to a window (one encoder pass instead of
several) and split back by word timestamps; clips whose attribution is unclear are
decoded again on their own. `mode="sequential"` runs openai-whisper's own `transcribe`.
"""

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from whisper.audio import HOP_LENGTH, N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from whisper.timing import add_word_timestamps, dtw
from whisper.tokenizer import get_tokenizer
from whisper.utils import get_end

from decoding import TokenRules, decode_windows
from formats import Segment, Transcript, Word
from word_timing import snap_words
from windows import (
    best_attempt,
    FRAMES_PER_SECOND,
    PackedWord,
    Thresholds,
    is_silence,
    needs_fallback,
    pack_audio,
    parse_window,
    plan_packs,
    split_points,
    split_words,
    stream_clips,
)

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    fp16: Optional[bool] = None  # None: fp16 on cuda, fp32 on cpu
    window_budget: Optional[int] = None  # max windows per forward pass; None: by device
    max_new_tokens: int = 224
    compression_ratio_threshold: Optional[float] = 2.4
    logprob_threshold: Optional[float] = -1.0
    no_speech_threshold: Optional[float] = 0.6
    # whisper.transcribe's default; measured to change WER little either way
    condition_on_previous_text: bool = True
    cpu_threads: Optional[int] = None  # None: torch's default
    quantize_cpu: bool = False  # int8 dynamic quantization of Linear layers on cpu
    # bf16 weights and activations on cpu; None: on where the cpu has AMX bf16 (2-3x faster
    # encoder there; measured within the accuracy bar with tiny.en and base)
    cpu_bf16: Optional[bool] = None
    # Pack short clips several to a window (CPU). Off by default: under load a clip's
    # transcript then depends on its neighbours, and a soak run saw words dropped at a
    # clip boundary; it also did not pay for its split-back cost (docs/benchmarks.md).
    pack_short: Optional[bool] = False  # None: on for cpu, off for cuda
    pack_max_clip_seconds: float = 20.0  # longer requests are never packed
    pack_window_seconds: float = 28.0
    pack_gap_seconds: float = 2.0
    # cut long requests at pauses into streams decoded side by side (None: on cuda only;
    # on cpu the encoder already fills the cores, and each cut costs an extra window)
    split_long: Optional[bool] = None
    min_stream_seconds: float = 60.0  # pieces a long request is cut into are at least this long
    # Windows per encoder call. On CPU larger calls are slower per window (the attention
    # maps leave the cache: 112 ms/window alone, 108 in pairs, 164 in sixteens for base bf16
    # on 2 cores), so the step's windows are encoded in pairs; on GPU all at once.
    encoder_batch: Optional[int] = None
    sync_every: Optional[int] = None  # decoder steps between finished-row checks; None: by device
    seed: int = 0  # for the sampling at temperatures > 0

    def resolved(self, dims=None) -> "EngineConfig":
        """Fill in the device-dependent defaults (`dims`: the model's ModelDimensions)."""
        cuda = str(self.device).startswith("cuda")
        budget = self.window_budget
        if budget is None:
            budget = 16
            if cuda and dims is not None:
                budget = gpu_window_budget(torch.device(self.device), dims)
        return replace(
            self,
            fp16=cuda if self.fp16 is None else (self.fp16 and cuda),
            window_budget=budget,
            pack_short=(not cuda) if self.pack_short is None else self.pack_short,
            split_long=cuda if self.split_long is None else self.split_long,
            sync_every=(4 if cuda else 1) if self.sync_every is None else self.sync_every,
            encoder_batch=(budget if cuda else 2) if self.encoder_batch is None else self.encoder_batch,
            quantize_cpu=self.quantize_cpu and not cuda,
            cpu_bf16=(cpu_has_amx_bf16() if self.cpu_bf16 is None else self.cpu_bf16)
            and not cuda and not self.quantize_cpu,
        )

    @property
    def dtype(self) -> torch.dtype:
        if self.fp16:
            return torch.float16
        return torch.bfloat16 if self.cpu_bf16 else torch.float32


def cpu_has_amx_bf16() -> bool:
    """True when the cpu has AMX bf16 tiles (Linux: from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def gpu_window_budget(device: torch.device, dims, fraction: float = 0.5) -> int:
    """Windows per pass that fit in `fraction` of the GPU memory still free: per window
    the fp16 cross-attention keys/values of every decoder layer, the self-attention
    cache, and the encoder's widest activations (the MLP, 4x the width)."""
    free, _ = torch.cuda.mem_get_info(device)
    cross = 2 * dims.n_text_layer * dims.n_audio_ctx * dims.n_text_state * 2
    self_cache = 2 * dims.n_text_layer * dims.n_text_ctx * dims.n_text_state * 2
    encoder = 3 * dims.n_audio_ctx * 4 * dims.n_audio_state * 2
    logits = 4 * dims.n_vocab * 4
    per_window = cross + self_cache + encoder + logits
    return int(max(1, min(256, fraction * free // per_window)))


def prepare_model(model, config: EngineConfig):
    """Move the model to the device: fp16 weights with fp32 LayerNorms on cuda (so no
    weight is cast per call); on cpu optionally bf16 the same way, or int8 dynamic
    quantization of the Linears. Reduced-precision cpu models are copies."""
    model = model.to(config.device).eval()
    if config.fp16 or config.cpu_bf16:
        if config.cpu_bf16:
            import copy

            model = copy.deepcopy(model)
        model.to(config.dtype)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.float()
    elif config.quantize_cpu:
        from quantize import quantize_linears

        model = quantize_linears(model)
    return model


@dataclass
class _Request:
    index: int
    audio: np.ndarray
    options: object
    language: Optional[str] = None
    mel: Optional[torch.Tensor] = None
    content_frames: int = 0


@dataclass
class _Stream:
    """One run of consecutive windows from `clip_start`, keeping the segments that start
    before `clip_end` (where the next stream of the same request begins). Windows are not
    truncated at clip_end, so speech just before the cut is decoded in full context."""

    owner: int  # request index, or -1 - pack index for a packed window
    mel: torch.Tensor
    content_frames: int
    clip_start: int
    clip_end: int
    request: _Request  # holds the language, set on the first window when detected
    task: str
    temperatures: Tuple[float, ...]
    word_timestamps: bool
    initial_prompt: List[int]
    seek: int = 0
    all_tokens: List[int] = field(default_factory=list)
    prompt_reset_since: int = 0
    segments: List[dict] = field(default_factory=list)
    last_speech_timestamp: float = 0.0

    @property
    def language(self) -> Optional[str]:
        return self.request.language

    @property
    def done(self) -> bool:
        return self.seek >= min(self.clip_end, self.content_frames)


@dataclass
class _Pack:
    requests: List[int]
    layout: object
    stream: Optional[_Stream] = None


class _Encoded:
    """The model as whisper.timing sees it, fed the window's encoder output instead of
    its mel, so word timestamps do not run the encoder a second time."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, audio_features, tokens):
        return self.model.decoder(tokens, audio_features)


def words_on_speech(transcript: Transcript, audio: np.ndarray) -> Transcript:
    """The transcript with its word edges moved off pauses (see word_timing.py) and, as
    whisper's add_word_timestamps does, each segment spanning exactly its words."""
    counts = [len(s.words or []) for s in transcript.segments]
    snapped = iter(snap_words([w for s in transcript.segments for w in s.words or []], audio))
    segments = []
    for segment, n in zip(transcript.segments, counts):
        if n:
            words = [next(snapped) for _ in range(n)]
            segment = replace(segment, words=words, start=words[0].start, end=words[-1].end)
        segments.append(segment)
    return replace(transcript, segments=segments)


def _option(options, name, default=None):
    value = getattr(options, name, default)
    return default if value is None else value


class Engine:
    """Transcribe lists of (audio, TranscriptionOptions), batching windows across them."""

    def __init__(self, model, config: EngineConfig = EngineConfig()):
        self.config = config.resolved(model.dims)
        if self.config.cpu_threads and not str(self.config.device).startswith("cuda"):
            torch.set_num_threads(self.config.cpu_threads)
        self.model = prepare_model(model, self.config)
        # mode="sequential" is the seed's behaviour: the model as loaded, not a reduced copy
        reduced = self.config.cpu_bf16 or self.config.quantize_cpu
        self.sequential_model = model if reduced else self.model
        self.device = torch.device(self.config.device)
        self.dtype = self.config.dtype
        self.thresholds = Thresholds(
            self.config.compression_ratio_threshold,
            self.config.logprob_threshold,
            self.config.no_speech_threshold,
        )
        tokenizer = self.tokenizer("en", "transcribe")
        self.rules = TokenRules(
            tokenizer, self.model.dims.n_vocab, self.model.dims.n_audio_ctx, self.device
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.config.seed)
        # Counters and seconds per phase since start; the handler logs and exports the deltas.
        self.stats = {
            "encoder_passes": 0, "encoder_windows": 0, "decoded_windows": 0, "fallback_windows": 0,
            "mel_s": 0.0, "encode_s": 0.0, "decode_s": 0.0,
        }

    def tokenizer(self, language: Optional[str], task: str):
        model = self.model
        return get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=language if model.is_multilingual else "en",
            task=task if model.is_multilingual else "transcribe",
        )

    # ------------------------------------------------------------------ public entry

    def warmup(self) -> None:
        """Run two short synthetic clips with word timestamps through the batched path, so
        the first real requests do not pay for lazy initialisation (numba compiles
        whisper.timing's DTW on first use, cuDNN picks its kernels)."""
        from options import TranscriptionOptions

        t = np.arange(SAMPLE_RATE * 2) / SAMPLE_RATE
        clip = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        stats = dict(self.stats)
        self.transcribe([(clip, TranscriptionOptions(word_timestamps=True))] * 2)
        self.stats = stats
        # numba (cpu) or triton (cuda) compile the DTW of word timestamps on first use
        dtw(torch.randn(20, 40, device=self.device))

    @torch.no_grad()
    def transcribe(self, requests: Sequence[Tuple[np.ndarray, object]]) -> List[Transcript]:
        results: List[Optional[Transcript]] = [None] * len(requests)
        batched = []
        for i, (audio, options) in enumerate(requests):
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)
            if _option(options, "mode", "batched") == "sequential":
                results[i] = self.transcribe_sequential(audio, options)
            else:
                batched.append(_Request(i, audio, options))
        if batched:
            for request, transcript in zip(batched, self._transcribe_batched(batched)):
                results[request.index] = transcript
        for i, (audio, options) in enumerate(requests):
            if _option(options, "word_timestamps", False):
                results[i] = words_on_speech(results[i], np.asarray(audio, dtype=np.float32).reshape(-1))
        return results

    def transcribe_sequential(self, audio: np.ndarray, options) -> Transcript:
        """The seed's behaviour: openai-whisper's transcribe with its defaults."""
        temperature = _option(options, "temperature", DEFAULT_TEMPERATURES)
        result = self.sequential_model.transcribe(
            audio,
            language=_option(options, "language"),
            task=_option(options, "task", "transcribe"),
            initial_prompt=_option(options, "prompt"),
            temperature=tuple(temperature) if isinstance(temperature, (list, tuple)) else temperature,
            word_timestamps=bool(_option(options, "word_timestamps", False)),
            fp16=self.config.fp16,
        )
        segments = [
            Segment(
                id=s["id"], seek=s["seek"], start=s["start"], end=s["end"], text=s["text"],
                tokens=list(s["tokens"]), temperature=s["temperature"],
                avg_logprob=s["avg_logprob"], compression_ratio=s["compression_ratio"],
                no_speech_prob=s["no_speech_prob"],
                words=[Word(**w) for w in s["words"]] if "words" in s else None,
            )
            for s in result["segments"]
        ]
        return Transcript(
            text=result["text"], language=result["language"], duration=len(audio) / SAMPLE_RATE,
            segments=segments, task=_option(options, "task", "transcribe"),
        )

    # ------------------------------------------------------------------ batched path

    def _clock(self) -> float:
        """Wall time after the device has finished its queued work (phase timings)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _transcribe_batched(self, requests: List[_Request]) -> List[Transcript]:
        started = self._clock()
        for r in requests:
            audio = torch.from_numpy(r.audio).to(self.device)
            # like transcribe: mel of the whole audio plus 30 s of zeros, sliced at the seek
            r.mel = log_mel_spectrogram(audio, self.model.dims.n_mels, padding=N_SAMPLES)
            r.content_frames = r.mel.shape[-1] - N_FRAMES
        self.stats["mel_s"] += self._clock() - started
        for r in requests:
            r.language = "en" if not self.model.is_multilingual else _option(r.options, "language")

        packs, alone = self._plan_packs(requests)
        streams: Dict[int, List[_Stream]] = {}
        for r in alone:
            streams[r.index] = self._streams_for(r, len(alone) + len(packs))
        for p in packs:
            p.stream = self._pack_stream(p, requests)
        self._run([s for ss in streams.values() for s in ss] + [p.stream for p in packs])

        by_index = {r.index: r for r in requests}
        packed_words: Dict[int, Tuple[List[PackedWord], _Stream]] = {}
        redo: List[_Request] = []
        for p in packs:
            per_clip, ambiguous = self._split_pack(p)
            for k, index in enumerate(p.requests):
                if k in ambiguous:
                    redo.append(by_index[index])
                else:
                    packed_words[index] = (per_clip[k], p.stream)
        if redo:
            for r in redo:
                streams[r.index] = self._streams_for(r, len(redo))
            self._run([s for r in redo for s in streams[r.index]])

        transcripts = []
        for r in requests:
            if r.index in packed_words:
                words, stream = packed_words[r.index]
                transcripts.append(self._packed_transcript(r, words, stream))
            else:
                transcripts.append(self._transcript(r, streams[r.index]))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return transcripts

    def _new_stream(self, owner, mel, content_frames, clip, request, options, word_ts):
        prompt = _option(options, "prompt")
        prompt_tokens = []
        if prompt:  # the BPE is the same for every language
            tokenizer = self.tokenizer("en", _option(options, "task", "transcribe"))
            prompt_tokens = tokenizer.encode(" " + prompt.strip())
        temperature = _option(options, "temperature", DEFAULT_TEMPERATURES)
        if isinstance(temperature, (int, float)):
            temperature = (float(temperature),)
        return _Stream(
            owner=owner, mel=mel, content_frames=content_frames,
            clip_start=clip[0], clip_end=clip[1], seek=clip[0], request=request,
            task=_option(options, "task", "transcribe"), temperatures=tuple(temperature),
            word_timestamps=word_ts, initial_prompt=list(prompt_tokens),
            all_tokens=list(prompt_tokens),
        )

    def _streams_for(self, r: _Request, n_streams: int) -> List[_Stream]:
        """A request's streams: the whole file, or pieces cut at pauses when the batch has
        room for more streams than there are requests."""
        cuts = []
        duration = r.content_frames / FRAMES_PER_SECOND
        if self.config.split_long and n_streams < self.config.window_budget:
            free = self.config.window_budget - n_streams + 1
            n_pieces = min(int(duration // self.config.min_stream_seconds), free)
            if n_pieces > 1:
                cuts = split_points(r.audio, n_pieces)
        word_ts = bool(_option(r.options, "word_timestamps", False))
        return [
            self._new_stream(r.index, r.mel, r.content_frames, clip, r, r.options, word_ts)
            for clip in stream_clips(r.content_frames, cuts)
        ]

    # ------------------------------------------------------------------ packing

    def _plan_packs(self, requests: List[_Request]):
        """Pack short requests that share language, task and temperatures and have no
        prompt; returns (packs of two or more, requests decoded alone)."""
        if not self.config.pack_short:
            return [], list(requests)
        groups: Dict[tuple, List[_Request]] = {}
        alone = []
        for r in requests:
            o = r.options
            duration = len(r.audio) / SAMPLE_RATE
            if (
                _option(o, "prompt")
                or r.language is None  # detected from its own first window
                or duration > self.config.pack_max_clip_seconds
            ):
                alone.append(r)
                continue
            key = (r.language, _option(o, "task", "transcribe"),
                   tuple(_option(o, "temperature", DEFAULT_TEMPERATURES)))
            groups.setdefault(key, []).append(r)
        packs = []
        for group in groups.values():
            plan = plan_packs(
                [len(r.audio) / SAMPLE_RATE for r in group],
                self.config.pack_window_seconds, self.config.pack_gap_seconds,
            )
            for members in plan:
                if len(members) == 1:
                    alone.append(group[members[0]])
                else:
                    packs.append(_Pack([group[m].index for m in members], None))
        return packs, alone

    def _pack_stream(self, pack: _Pack, requests: List[_Request]) -> _Stream:
        by_index = {r.index: r for r in requests}
        members = [by_index[i] for i in pack.requests]
        audio, pack.layout = pack_audio([r.audio for r in members], self.config.pack_gap_seconds)
        mel = log_mel_spectrogram(
            torch.from_numpy(audio).to(self.device), self.model.dims.n_mels, padding=N_SAMPLES
        )
        content_frames = mel.shape[-1] - N_FRAMES
        first = members[0]
        return self._new_stream(-1, mel, content_frames, (0, content_frames),
                                first, first.options, word_ts=True)

    def _split_pack(self, pack: _Pack):
        words = [
            PackedWord(w["word"], w["start"], w["end"], w["probability"], i)
            for i, s in enumerate(pack.stream.segments)
            for w in s.get("words") or []
        ]
        split = split_words(words, pack.layout)
        return split.words, set(split.ambiguous)

    def _packed_transcript(self, r: _Request, words: List[PackedWord], stream: _Stream):
        tokenizer = self.tokenizer(stream.language, stream.task)
        want_words = bool(_option(r.options, "word_timestamps", False))
        segments = []
        for source, group in itertools.groupby(words, key=lambda w: w.segment):
            group = list(group)
            s = stream.segments[source]
            text = "".join(w.word for w in group)
            segments.append(
                Segment(
                    id=len(segments), seek=0, start=group[0].start, end=group[-1].end,
                    text=text, tokens=tokenizer.encode(text), temperature=s["temperature"],
                    avg_logprob=s["avg_logprob"], compression_ratio=s["compression_ratio"],
                    no_speech_prob=s["no_speech_prob"],
                    words=[Word(w.word, w.start, w.end, w.probability) for w in group]
                    if want_words else None,
                )
            )
        return Transcript(
            text="".join(s.text for s in segments), language=stream.language,
            duration=len(r.audio) / SAMPLE_RATE, segments=segments, task=stream.task,
        )

    # ------------------------------------------------------------------ the loop

    def _run(self, streams: List[_Stream]) -> None:
        """Step all streams to their ends, `window_budget` windows per forward pass."""
        budget = self.config.window_budget
        while True:
            active = [s for s in streams if not s.done][:budget]
            if not active:
                break
            self._step(active)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _step(self, streams: List[_Stream]) -> None:
        sizes, mels = [], []
        for s in streams:
            size = min(N_FRAMES, s.content_frames - s.seek)
            sizes.append(size)
            mels.append(pad_or_trim(s.mel[:, s.seek : s.seek + size], N_FRAMES))
        mel = torch.stack(mels).to(self.dtype)
        started = self._clock()
        step = self.config.encoder_batch
        features = torch.cat([self.model.encoder(mel[i : i + step]) for i in range(0, len(mel), step)])
        encoded = self._clock()
        self.stats["encode_s"] += encoded - started
        self.stats["encoder_passes"] += 1
        self.stats["encoder_windows"] += len(streams)
        self._detect_languages(streams, features)

        results = self._decode_with_fallback(streams, features)
        for s, size, window_features, result in zip(streams, sizes, features, results):
            self._advance(s, size, window_features, result)
        self.stats["decode_s"] += self._clock() - encoded

    def _detect_languages(self, streams: List[_Stream], features: torch.Tensor) -> None:
        """Detect the language of requests that did not give one from the encoder output
        of their first window, in one batch; transcribe would run the encoder again."""
        rows = [i for i, s in enumerate(streams) if s.language is None]
        if not rows:
            return
        index = torch.tensor(rows, device=features.device)
        _, probs = self.model.detect_language(
            features.index_select(0, index), self.tokenizer(None, "transcribe")
        )
        for i, p in zip(rows, probs):
            if streams[i].request.language is None:  # the first piece of a request decides
                streams[i].request.language = max(p, key=p.get)

    def _initial_tokens(self, s: _Stream) -> List[int]:
        tokenizer = self.tokenizer(s.language, s.task)
        tokens = list(tokenizer.sot_sequence)
        prompt = s.all_tokens[s.prompt_reset_since :]
        if prompt:
            n_ctx = self.model.dims.n_text_ctx
            tokens = [tokenizer.sot_prev] + prompt[-(n_ctx // 2 - 1) :] + tokens
        return tokens

    def _decode_with_fallback(self, streams: List[_Stream], features: torch.Tensor):
        """Decode all rows at their first temperature, then only the failed rows again at
        each next temperature, as a smaller batch. A row that fails at every temperature
        keeps its best attempt (as faster-whisper does), not whisper's last, hottest one."""
        initial = [self._initial_tokens(s) for s in streams]
        results = [None] * len(streams)
        attempts: Dict[int, list] = {}
        pending = list(range(len(streams)))
        level = 0
        while pending:
            groups: Dict[float, List[int]] = {}
            for i in pending:
                temps = streams[i].temperatures
                groups.setdefault(temps[min(level, len(temps) - 1)], []).append(i)
            retry = []
            for temperature, rows in groups.items():
                index = torch.tensor(rows, device=features.device)
                decoded = decode_windows(
                    self.model, features.index_select(0, index), [initial[i] for i in rows],
                    self.tokenizer(streams[rows[0]].language, streams[rows[0]].task),
                    self.rules, temperature=temperature,
                    max_new_tokens=self.config.max_new_tokens,
                    sync_every=self.config.sync_every, generator=self.generator,
                )
                self.stats["decoded_windows"] += len(rows)
                if level:
                    self.stats["fallback_windows"] += len(rows)
                for i, result in zip(rows, decoded):
                    results[i] = result
                    attempts.setdefault(i, []).append(result)
                    if needs_fallback(result, self.thresholds):
                        if level + 1 < len(streams[i].temperatures):
                            retry.append(i)
                        else:
                            results[i] = best_attempt(attempts[i], self.thresholds)
            pending = retry
            level += 1
        return results

    def _advance(self, s: _Stream, size: int, features: torch.Tensor, result) -> None:
        """Apply one decoded window to its stream, as one iteration of transcribe's loop."""
        if is_silence(result, self.thresholds):
            s.seek += size
            return
        tokenizer = self.tokenizer(s.language, s.task)
        previous_seek = s.seek
        time_offset = s.seek * HOP_LENGTH / SAMPLE_RATE
        parsed = parse_window(result.tokens, tokenizer.timestamp_begin, s.seek, size)
        pieces, next_seek, reached_cut = parsed.segments, parsed.next_seek, False
        if s.clip_end < s.content_frames:
            # a cut stream: the segments centred after the cut belong to the next stream
            cut = s.clip_end * HOP_LENGTH / SAMPLE_RATE
            kept = [p for p in pieces if (p.start + p.end) / 2 < cut]
            if len(kept) < len(pieces):
                pieces, next_seek, reached_cut = kept, max(next_seek, s.clip_end), True
        segments = []
        for piece in pieces:
            text_tokens = [t for t in piece.tokens if t < tokenizer.eot]
            segments.append(
                dict(
                    seek=previous_seek, start=piece.start, end=piece.end,
                    text=tokenizer.decode(text_tokens), tokens=piece.tokens,
                    temperature=result.temperature, avg_logprob=result.avg_logprob,
                    compression_ratio=result.compression_ratio,
                    no_speech_prob=result.no_speech_prob,
                )
            )
        s.seek = next_seek

        if s.word_timestamps:
            add_word_timestamps(
                segments=segments, model=_Encoded(self.model), tokenizer=tokenizer,
                mel=features, num_frames=size,
                last_speech_timestamp=s.last_speech_timestamp,
            )
            if not parsed.single_timestamp_ending and not reached_cut:
                last_word_end = get_end(segments)
                if last_word_end is not None and last_word_end > time_offset:
                    s.seek = round(last_word_end * FRAMES_PER_SECOND)
            last_word_end = get_end(segments)
            if last_word_end is not None:
                s.last_speech_timestamp = last_word_end

        # an instantaneous or textless segment is kept empty, as transcribe does
        for segment in segments:
            if segment["start"] == segment["end"] or segment["text"].strip() == "":
                segment["text"], segment["tokens"], segment["words"] = "", [], []
        s.segments.extend(segments)
        s.all_tokens.extend(t for segment in segments for t in segment["tokens"])
        if not self.config.condition_on_previous_text or result.temperature > 0.5:
            s.prompt_reset_since = len(s.all_tokens)

    def _transcript(self, r: _Request, streams: List[_Stream]) -> Transcript:
        tokenizer = self.tokenizer(r.language, _option(r.options, "task", "transcribe"))
        want_words = bool(_option(r.options, "word_timestamps", False))
        segments, tokens = [], []
        for s in sorted(streams, key=lambda s: s.clip_start):
            tokens.extend(s.all_tokens[len(s.initial_prompt) :])
            for d in s.segments:
                segments.append(
                    Segment(
                        id=len(segments), seek=d["seek"], start=d["start"], end=d["end"],
                        text=d["text"], tokens=list(d["tokens"]), temperature=d["temperature"],
                        avg_logprob=d["avg_logprob"], compression_ratio=d["compression_ratio"],
                        no_speech_prob=d["no_speech_prob"],
                        words=[Word(w["word"], w["start"], w["end"], w["probability"])
                               for w in d.get("words") or []] if want_words else None,
                    )
                )
        return Transcript(
            text=tokenizer.decode(tokens), language=r.language,
            duration=len(r.audio) / SAMPLE_RATE, segments=segments,
            task=_option(r.options, "task", "transcribe"),
        )
