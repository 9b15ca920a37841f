"""Uploaded bytes -> float32 mono 16 kHz samples in [-1, 1].

libsndfile (through soundfile) reads wav, flac, ogg (vorbis, opus), mp3, aiff and friends
straight from memory. Anything else (m4a/mp4, webm/mkv, aac, ...) goes to ffmpeg, which reads
the upload from a stdin pipe; only an mp4 whose index ("moov") comes after its data has to be
written to a private temporary directory, because ffmpeg must seek in it. That directory is
removed on every path.

Both decoders are bounded: the soundfile path checks the frame count in the header before
reading and then reads in blocks, never more than the limit (so a header that claims 10 hours
but holds 1 s costs 1 s), and ffmpeg gets `-t limit+1 s` plus a wall-clock timeout, so a
small, highly compressed upload cannot expand into unbounded output.

Errors (all RequestError, see errors.py):
- empty body                                   -> 400 empty_body
- neither decoder recognises it as media at all (text, random bytes, documents, ...)
                                               -> 400 not_audio
- ffmpeg opens it as media but it holds no audio stream (an image, a silent video, ...)
                                               -> 415 unsupported_media_type
- its first bytes are a known audio/video container but it cannot be decoded (a truncated
  or corrupt file)                             -> 400 undecodable_audio
- ffmpeg needed for a known container but not installed
                                               -> 415 ffmpeg_missing ("ffmpeg is required ...")
- ffmpeg ran past its timeout                  -> 400 decode_timeout
- decodes to zero samples                      -> 400 zero_length_audio
- NaN or infinite samples (float files)        -> 400 invalid_samples; rejected rather than
  zeroed, because such a file is broken and silently patching it would hide that
- longer than max_duration_s (+50 ms of slack for codec padding)
                                               -> 413 audio_too_long (duration and limit named)
Loud audio is not an error: float samples beyond [-1, 1] are clipped. A truncated file whose
header survived decodes to the part that is there (the client gets a transcript of it).
Random bytes that happen to begin with a valid MPEG frame header (about 1 in 3,000) count as
broken mp3 (400 undecodable_audio rather than 400 not_audio).
"""

import io
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import soundfile as sf
import soxr

from errors import AudioTooLong, InvalidAudio, RequestError, UnsupportedMediaType

SAMPLE_RATE = 16000
BLOCK_FRAMES = 1 << 18  # frames per soundfile read, so memory follows the real length
# Lossy codecs add encoder delay and padding (mp3 up to ~50 ms, aac ~10 ms) and resampling
# rounds, so a file cut at exactly the limit must not fail on those few extra milliseconds.
DURATION_SLACK_S = 0.05
TEMP_PREFIX = "whisper-audio-"  # private temporary directories (mp4 with its index at the end)


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, 16 kHz, in [-1, 1]
    source_rate: Optional[int]  # of the upload; None if ffmpeg did not report it
    channels: Optional[int]  # of the upload; None if ffmpeg did not report it
    duration_s: float  # of the decoded samples
    decoder: str  # "soundfile" | "ffmpeg"
    source_format: Optional[str]  # "wav", "flac", "mp3", "m4a", ... or None if unknown


def sniff_format(data: bytes) -> Optional[str]:
    """Container format from the first bytes, or None if it is not one we know."""
    head = bytes(data[:64])
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "opus" if b"OpusHead" in head else "ogg"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 3 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # MPEG audio frame sync; layer bits 00 mean an ADTS (AAC) header instead. Reserved
        # field values are refused so fewer random byte strings pass for audio (about 1 in
        # 3,000 still does: those are answered as broken mp3, 400).
        if head[1] & 0xF6 == 0xF0:
            return "aac"
        version, bitrate, rate = (head[1] >> 3) & 3, head[2] >> 4, (head[2] >> 2) & 3
        if version != 1 and head[1] & 0x06 and bitrate not in (0, 15) and rate != 3:
            return "mp3"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "m4a" if brand in (b"M4A ", b"M4B ") else "mov" if brand == b"qt  " else "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML
        return "webm" if b"webm" in head else "mkv"
    if head[:4] == b"caff":
        return "caf"
    if head[:4] == b".snd":
        return "au"
    if head[:5] == b"#!AMR":
        return "amr"
    if head[:4] == b"\x30\x26\xb2\x75":  # ASF header GUID
        return "wma"
    return None


def decode_audio(
    data: bytes, *, max_duration_s: Optional[float] = None, ffmpeg_timeout_s: float = 60
) -> DecodedAudio:
    """Decode an upload; see the module docstring for the errors it raises."""
    if not data:
        raise InvalidAudio("empty_body", "The request carried no audio (empty body).")
    data = bytes(data)
    source_format = sniff_format(data)
    decoded = _decode_soundfile(data, max_duration_s)
    if decoded is None:
        decoded = _decode_ffmpeg(data, source_format, max_duration_s, ffmpeg_timeout_s)
    _validate(decoded.samples, max_duration_s)
    return decoded


def _too_long(duration_s: float, max_duration_s: float, at_least: bool = False) -> AudioTooLong:
    what = f"at least {duration_s:.1f} s" if at_least else f"{duration_s:.1f} s"
    return AudioTooLong(
        f"Audio is {what} long; the limit is {max_duration_s:g} s. Split it and send the parts."
    )


def _validate(samples: np.ndarray, max_duration_s: Optional[float]) -> None:
    if samples.size == 0:
        raise InvalidAudio("zero_length_audio", "The audio decoded to zero samples.")
    if not np.isfinite(samples).all():
        raise InvalidAudio("invalid_samples", "The audio contains NaN or infinite samples.")
    duration_s = samples.size / SAMPLE_RATE
    if max_duration_s is not None and duration_s > max_duration_s + DURATION_SLACK_S:
        raise _too_long(duration_s, max_duration_s, at_least=True)
    # Loud float audio is fine; clip it to the range Whisper's front end expects.
    np.clip(samples, -1.0, 1.0, out=samples)


def _decode_soundfile(data: bytes, max_duration_s: Optional[float]) -> Optional[DecodedAudio]:
    """libsndfile's decode, or None when it cannot read this input (ffmpeg is tried next)."""
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            limit = None
            if max_duration_s is not None:
                limit = int((max_duration_s + DURATION_SLACK_S) * rate)
            if limit is not None and frames > limit:
                # The header already says it is too long: reject before reading anything.
                raise _too_long(frames / rate, max_duration_s)
            parts, total = [], 0
            # Read one frame past the limit so a header that understates is still caught.
            while limit is None or total <= limit:
                block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                if not len(block):
                    break
                # Downmix per block (mean of channels), so memory is mono-sized.
                parts.append(block.mean(axis=1, dtype=np.float32) if channels > 1 else block[:, 0])
                total += len(block)
            source_format = f.format.lower()
    except RequestError:
        raise
    except Exception:
        return None  # not readable by libsndfile (or broken mid-stream): let ffmpeg try
    if limit is not None and total > limit:
        raise _too_long(total / rate, max_duration_s, at_least=True)
    mono = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if not np.isfinite(mono).all():
        # Checked before resampling, whose filters would smear a NaN over its neighbours.
        raise InvalidAudio("invalid_samples", "The audio contains NaN or infinite samples.")
    samples = _resample(mono, rate)
    return DecodedAudio(
        samples, rate, channels, len(samples) / SAMPLE_RATE, "soundfile", source_format
    )


def _resample(mono: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE or mono.size == 0:
        return np.array(mono, dtype=np.float32)  # a writable copy, clipped later in place
    # soxr, the resampler librosa uses for res_type="soxr_hq", called directly: librosa's
    # resample compiles numba functions on first use (15 s on this project's CPUs, at the
    # first resampled upload of every worker) for the same samples
    return np.asarray(soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ"), dtype=np.float32)


def _mp4_index_at_end(data: bytes) -> bool:
    """True if an mp4's top-level "mdat" comes before its "moov" (ffmpeg must then seek)."""
    pos = 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"moov":
            return False
        if kind == b"mdat":
            return True
        if size == 1 and pos + 16 <= len(data):  # 64-bit box size follows the type
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        if size < 8:  # 0 = "to the end of file", or a broken size
            return False
        pos += size
    return False


def _decode_ffmpeg(
    data: bytes, source_format: Optional[str], max_duration_s: Optional[float], timeout_s: float
) -> DecodedAudio:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        if source_format is None:
            raise _not_audio()
        raise UnsupportedMediaType(
            f"ffmpeg is required to decode {source_format} audio and is not installed "
            "on the server.",
            code="ffmpeg_missing",
        )
    if source_format in ("mp4", "m4a", "mov") and _mp4_index_at_end(data):
        tmpdir = tempfile.mkdtemp(prefix=TEMP_PREFIX)  # mode 0700: private to this process
        try:
            path = os.path.join(tmpdir, "upload")
            with open(path, "wb") as f:
                f.write(data)
            # Force the mov demuxer: a file input must not be read as a playlist (hls,
            # concat) that could point ffmpeg at other local files.
            argv = _ffmpeg_argv(ffmpeg, path, "file", max_duration_s, input_format="mov")
            return _run_ffmpeg(argv, None, source_format, max_duration_s, timeout_s)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    argv = _ffmpeg_argv(ffmpeg, "pipe:0", "pipe", max_duration_s)
    return _run_ffmpeg(argv, data, source_format, max_duration_s, timeout_s)


def _ffmpeg_argv(ffmpeg, source, protocols, max_duration_s, input_format=None) -> list:
    # "level+info": every stderr line tagged with its level, so errors can be told from
    # the input description (rate, channels, duration) that is parsed for logs.
    argv = [ffmpeg, "-nostdin", "-hide_banner", "-nostats", "-loglevel", "level+info"]
    argv += ["-protocol_whitelist", protocols]  # no network, no other files
    if input_format:
        argv += ["-f", input_format]
    argv += ["-i", source, "-map", "0:a:0"]
    if max_duration_s is not None:
        # One second past the limit: enough to tell "too long", bounded output either way.
        argv += ["-t", f"{max_duration_s + 1:.3f}"]
    # rematrix_maxval=1 makes the downmix the mean of the channels (ffmpeg's default for
    # float output is 0.707 * (L + R), louder than the soundfile path).
    argv += ["-af", "aresample=rematrix_maxval=1.0"]
    argv += ["-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "pipe:1"]
    return argv


DECLARED_DURATION = re.compile(rb"\] +Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")


def _run_ffmpeg(argv, stdin_data, source_format, max_duration_s, timeout_s) -> DecodedAudio:
    """Run ffmpeg, stopping it as soon as the input's declared duration is over the limit:
    a small upload that declares hours (a "zip bomb") costs milliseconds, not a decode."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stderr, declared_too_long, timed_out = [], [], threading.Event()

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line)
            m = DECLARED_DURATION.search(line) if max_duration_s is not None else None
            if m and not declared_too_long:
                seconds = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
                if seconds > max_duration_s + DURATION_SLACK_S:
                    declared_too_long.append(seconds)
                    proc.kill()

    def write_stdin():
        try:
            proc.stdin.write(stdin_data)
        except OSError:  # ffmpeg stopped reading (done, refused the input, or killed)
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def kill_at_timeout():
        timed_out.set()
        proc.kill()

    helpers = [threading.Thread(target=read_stderr, daemon=True)]
    if stdin_data is not None:
        helpers.append(threading.Thread(target=write_stdin, daemon=True))
    timer = threading.Timer(timeout_s, kill_at_timeout)
    for thread in helpers:
        thread.start()
    timer.start()
    try:
        stdout = proc.stdout.read()  # bounded by -t
    finally:
        timer.cancel()
        proc.wait()
        for thread in helpers:
            thread.join()
    if declared_too_long:
        raise _too_long(declared_too_long[0], max_duration_s)
    if timed_out.is_set():
        raise InvalidAudio("decode_timeout", f"Decoding the audio took longer than {timeout_s:g} s.")
    info = _ffmpeg_input_info(b"".join(stderr).decode("utf-8", "replace"))
    if proc.returncode != 0:
        detail = info["error"].replace(argv[argv.index("-i") + 1], "input")  # no server paths
        if info["no_audio_stream"]:
            kind = f"{info['container']} " if info["container"] else ""
            raise UnsupportedMediaType(
                f"Unsupported media: the upload is {kind}media without an audio stream."
            )
        if source_format is None:
            raise _not_audio()
        raise InvalidAudio(
            "undecodable_audio", f"Could not decode the {source_format} audio ({detail})."
        )
    # f32le output: a whole number of 4-byte samples unless ffmpeg was cut short.
    usable = len(stdout) - len(stdout) % 4
    samples = np.frombuffer(stdout[:usable], dtype="<f4").astype(np.float32)
    duration_s = len(samples) / SAMPLE_RATE
    if max_duration_s is not None and duration_s > max_duration_s + DURATION_SLACK_S:
        # ffmpeg stopped at -t; the container's own duration, when known, is the better figure.
        raise _too_long(max(duration_s, info["duration"] or 0.0), max_duration_s,
                        at_least=not info["duration"])
    return DecodedAudio(
        samples, info["rate"], info["channels"], duration_s, "ffmpeg", source_format
    )


CHANNEL_LAYOUTS = {"mono": 1, "stereo": 2, "2.1": 3, "3.0": 3, "3.0(back)": 3, "4.0": 4,
                   "quad": 4, "quad(side)": 4, "3.1": 4, "5.0": 5, "5.0(side)": 5, "4.1": 5,
                   "5.1": 6, "5.1(side)": 6, "6.0": 6, "6.1": 7, "7.0": 7, "7.1": 8,
                   "7.1(wide)": 8, "octagonal": 8}


def _not_audio() -> InvalidAudio:
    return InvalidAudio(
        "not_audio", "The upload is not audio: no known audio or video format was recognised."
    )


def _ffmpeg_input_info(stderr: str) -> dict:
    """Rate, channels and duration of the input's first audio stream, the container ffmpeg
    recognised, whether it lacks an audio stream, and the last error."""
    info = {"rate": None, "channels": None, "duration": None, "error": "ffmpeg failed",
            "container": None, "no_audio_stream": False}
    errors = []
    for line in stderr.splitlines():
        level = re.search(r"\[(info|error|fatal|panic|warning)\] ", line)
        if not level:
            continue
        text = line[level.end():].strip()
        if level.group(1) in ("error", "fatal", "panic"):
            errors.append(text)
        elif text.startswith("Output #"):
            break  # the rest describes the output, not the upload
        elif (m := re.match(r"Input #0, ([\w,]+), from", text)):
            info["container"] = m[1].split(",")[0].replace("_pipe", "")
        elif (m := re.match(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", text)):
            info["duration"] = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
        elif info["rate"] is None and (m := re.search(r"Audio: .*?, (\d+) Hz, ([^,]+)", text)):
            info["rate"] = int(m[1])
            layout = m[2].strip()
            n = re.match(r"(\d+) channels", layout)
            info["channels"] = int(n[1]) if n else CHANNEL_LAYOUTS.get(layout)
    if errors:
        info["error"] = errors[-1][:300]
    # "-map 0:a:0" names the first audio stream; ffmpeg says so when there is none.
    info["no_audio_stream"] = any("matches no streams" in e for e in errors)
    return info
