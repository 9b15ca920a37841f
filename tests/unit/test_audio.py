"""decode_audio on generated audio: lengths, content (frequency, level, downmix) and errors."""

import io
import os
import shutil
import struct
import subprocess
import tempfile
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from audio import SAMPLE_RATE, TEMP_PREFIX, decode_audio, sniff_format
from errors import AudioTooLong, InvalidAudio, UnsupportedMediaType

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg not installed")


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(samples, rate, subtype="PCM_16", format="WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=format, subtype=subtype)
    return buf.getvalue()


def peaks_hz(x: np.ndarray, n: int = 1) -> list:
    """The n strongest frequencies (Hz) of 16 kHz samples."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    hz = np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)
    found = []
    for index in np.argsort(spectrum)[::-1]:
        if all(abs(hz[index] - f) > 20 for f in found):
            found.append(hz[index])
        if len(found) == n:
            return sorted(found)
    return sorted(found)


def level(x: np.ndarray) -> float:
    """Sine amplitude from the RMS of the middle half (edges hold codec/resampler ramps)."""
    mid = x[len(x) // 4 : 3 * len(x) // 4]
    return float(np.sqrt(np.mean(mid.astype(np.float64) ** 2)) * np.sqrt(2))


def ffmpeg_encode(tmp_path, source: bytes, args: list, suffix: str) -> bytes:
    """Encode WAV bytes with ffmpeg into a file (mp4 muxers need a seekable output)."""
    out = tmp_path / f"encoded{suffix}"
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", "pipe:0", *args, str(out)],
        input=source,
        capture_output=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"this ffmpeg cannot encode {args}: {proc.stderr.decode()[-200:]}")
    return out.read_bytes()


def leftover_temp_dirs() -> set:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(TEMP_PREFIX)}


# ---------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    "head, expected",
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "wav"),
        (b"fLaC\x00\x00\x00\x22", "flac"),
        (b"OggS\x00\x02" + b"\x00" * 22 + b"\x01vorbis", "ogg"),
        (b"OggS\x00\x02" + b"\x00" * 22 + b"OpusHead", "opus"),
        (b"ID3\x04\x00\x00", "mp3"),
        (b"\xff\xfb\x90\x64", "mp3"),
        (b"\xff\xf1\x50\x80", "aac"),
        (b"\xff\xfb\xf0\x64", None),  # bitrate index 15 is reserved
        (b"\xff\xeb\x90\x64", None),  # MPEG version 01 is reserved
        (b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00", "m4a"),
        (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00", "mp4"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "webm"),
        (b"\x1a\x45\xdf\xa3\xa3\x42\x82\x88matroska", "mkv"),
        (b"hello, this is text", None),
        (b"%PDF-1.7", None),
        (b"\x89PNG\r\n\x1a\n", None),
        (b"", None),
    ],
)
def test_sniff_format(head, expected):
    assert sniff_format(head) == expected


# ---------------------------------------------------------------- soundfile path


def test_wav_16k_mono_is_exact():
    x = tone(440, 2.0, 16000)
    audio = decode_audio(wav_bytes(x, 16000, "FLOAT"))
    assert audio.decoder == "soundfile" and audio.source_format == "wav"
    assert (audio.source_rate, audio.channels) == (16000, 1)
    assert audio.samples.dtype == np.float32 and audio.samples.flags.writeable
    np.testing.assert_array_equal(audio.samples, x)
    assert audio.duration_s == 2.0


def test_pcm16_is_scaled_to_unit_range():
    full_scale = np.array([32767, -32768, 16384, 0] * 100, dtype=np.int16)
    audio = decode_audio(wav_bytes(full_scale, 16000))
    assert audio.samples.max() == pytest.approx(32767 / 32768)
    assert audio.samples.min() == -1.0
    assert audio.samples[2] == pytest.approx(0.5)


def test_stereo_44k_is_averaged_and_resampled():
    rate = 44100
    left, right = tone(440, 2.5, rate, 0.6), tone(1000, 2.5, rate, 0.2)
    audio = decode_audio(wav_bytes(np.stack([left, right], axis=1), rate))
    assert (audio.source_rate, audio.channels) == (44100, 2)
    assert audio.duration_s == pytest.approx(2.5, abs=0.001)
    assert peaks_hz(audio.samples, 2) == pytest.approx([440, 1000], abs=2)
    # Mean of the channels: each tone at half its level.
    band = np.fft.rfft(audio.samples)
    hz = np.fft.rfftfreq(len(audio.samples), 1 / SAMPLE_RATE)
    amp = lambda f: 2 * np.abs(band[np.argmin(np.abs(hz - f))]) / len(audio.samples)
    assert amp(440) == pytest.approx(0.3, rel=0.02)
    assert amp(1000) == pytest.approx(0.1, rel=0.02)


def test_opposite_phase_stereo_cancels():
    x = tone(440, 1.0, 16000)
    audio = decode_audio(wav_bytes(np.stack([x, -x], axis=1), 16000, "FLOAT"))
    assert np.abs(audio.samples).max() < 1e-6


@pytest.mark.parametrize("rate", [8000, 22050, 48000, 96000])
def test_resampling_keeps_length_frequency_and_level(rate):
    freq = 3000 if rate > 8000 else 1000
    audio = decode_audio(wav_bytes(tone(freq, 3.0, rate), rate, "FLOAT"))
    assert audio.source_rate == rate
    assert audio.duration_s == pytest.approx(3.0, abs=0.001)
    assert peaks_hz(audio.samples) == pytest.approx([freq], abs=1)
    assert level(audio.samples) == pytest.approx(0.5, rel=0.01)


def test_content_above_8khz_is_removed_not_aliased():
    # 11 kHz at 48 kHz cannot exist at 16 kHz; a resampler without a proper filter would
    # fold it to 5 kHz.
    audio = decode_audio(wav_bytes(tone(11000, 1.0, 48000), 48000, "FLOAT"))
    assert level(audio.samples) < 0.01


def test_six_channels_are_averaged():
    rate = 48000
    channels = np.zeros((rate * 2, 6), np.float32)
    channels[:, 0] = tone(440, 2.0, rate, 0.6)
    channels[:, 3] = tone(440, 2.0, rate, 0.3)
    audio = decode_audio(wav_bytes(channels, rate, "FLOAT"))
    assert audio.channels == 6
    assert peaks_hz(audio.samples) == pytest.approx([440], abs=1)
    assert level(audio.samples) == pytest.approx(0.9 / 6, rel=0.01)


@pytest.mark.parametrize(
    "format, subtype, rate, expected_format, tolerance_s, level_rel",
    [
        ("FLAC", "PCM_16", 44100, "flac", 0.001, 0.01),
        ("OGG", "VORBIS", 44100, "ogg", 0.001, 0.05),
        ("OGG", "OPUS", 48000, "ogg", 0.001, 0.05),
        ("MP3", "MPEG_LAYER_III", 44100, "mp3", 0.06, 0.05),  # encoder delay and padding
    ],
)
def test_compressed_formats_via_soundfile(format, subtype, rate, expected_format, tolerance_s, level_rel):
    try:
        data = wav_bytes(tone(440, 2.0, rate), rate, subtype, format)
    except Exception as err:  # an older libsndfile without this codec
        pytest.skip(f"libsndfile cannot write {format}/{subtype}: {err}")
    audio = decode_audio(data)
    assert audio.decoder == "soundfile" and audio.source_format == expected_format
    assert audio.duration_s == pytest.approx(2.0, abs=tolerance_s)
    assert peaks_hz(audio.samples) == pytest.approx([440], abs=2)
    assert level(audio.samples) == pytest.approx(0.5, rel=level_rel)


def test_loud_float_audio_is_clipped():
    audio = decode_audio(wav_bytes(tone(440, 1.0, 16000, amp=3.0), 16000, "FLOAT"))
    assert audio.samples.max() == 1.0 and audio.samples.min() == -1.0


def test_one_sample_wav_is_accepted():
    audio = decode_audio(wav_bytes(np.array([0.25], np.float32), 16000, "FLOAT"))
    assert audio.samples.tolist() == [0.25] and audio.duration_s == 1 / 16000


# ---------------------------------------------------------------- ffmpeg path


@needs_ffmpeg
@pytest.mark.parametrize(
    "args, suffix, expected_format, tolerance_s",
    [
        (["-c:a", "aac", "-movflags", "+faststart"], ".m4a", "m4a", 0.03),
        (["-c:a", "aac"], ".m4a", "m4a", 0.03),  # index at the end: the temporary-file path
        (["-c:a", "alac"], ".m4a", "m4a", 0.001),
        (["-c:a", "libopus"], ".webm", "webm", 0.03),
        (["-c:a", "pcm_s16le"], ".mkv", "mkv", 0.001),
        (["-c:v", "mpeg4", "-c:a", "aac", "-shortest"], ".mp4", "mp4", 0.03),
    ],
)
def test_ffmpeg_formats(tmp_path, args, suffix, expected_format, tolerance_s):
    rate = 44100
    stereo = np.stack([tone(440, 2.0, rate, 0.6), tone(440, 2.0, rate, 0.2)], axis=1)
    if "mpeg4" in args:  # an audio track beside a video track
        video = ["-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=2"]
        args = [*video, "-map", "1:v", "-map", "0:a", *args]
    data = ffmpeg_encode(tmp_path, wav_bytes(stereo, rate), args, suffix)
    before = leftover_temp_dirs()
    audio = decode_audio(data, max_duration_s=60)
    assert leftover_temp_dirs() == before
    assert audio.decoder == "ffmpeg" and audio.source_format == expected_format
    assert audio.source_rate in (44100, 48000) and audio.channels == 2
    assert audio.duration_s == pytest.approx(2.0, abs=tolerance_s)
    assert peaks_hz(audio.samples) == pytest.approx([440], abs=2)
    # ffmpeg's downmix is set to the mean of the channels, as on the soundfile path.
    lossless = tolerance_s < 0.01
    assert level(audio.samples) == pytest.approx(0.4, rel=0.01 if lossless else 0.05)


@needs_ffmpeg
def test_resampling_by_ffmpeg_keeps_frequency(tmp_path):
    data = ffmpeg_encode(tmp_path, wav_bytes(tone(3000, 2.0, 96000), 96000), ["-c:a", "alac"], ".m4a")
    audio = decode_audio(data)
    assert audio.source_rate == 96000
    assert audio.duration_s == pytest.approx(2.0, abs=0.001)
    assert peaks_hz(audio.samples) == pytest.approx([3000], abs=1)
    assert level(audio.samples) == pytest.approx(0.5, rel=0.01)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("body", [b"", bytearray()])
def test_empty_body(body):
    with pytest.raises(InvalidAudio) as err:
        decode_audio(body)
    assert (err.value.status, err.value.code) == (400, "empty_body")


@needs_ffmpeg
@pytest.mark.parametrize(
    "body",
    [
        np.random.default_rng(0).bytes(50_000),
        np.random.default_rng(2).bytes(17),
        "This is a text file, not audio.\n".encode() * 200,
        b'{"text": "json is not audio"}',
    ],
)
def test_not_audio_is_400(body):
    with pytest.raises(InvalidAudio) as err:
        decode_audio(body)
    assert err.value.status == 400 and err.value.code == "not_audio"
    assert err.value.to_dict()["type"] == "invalid_request_error"


@needs_ffmpeg
def test_media_without_audio_is_415(tmp_path):
    """An image is media ffmpeg can open, but there is no audio in it."""
    png = tmp_path / "frame.png"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=red:s=32x32",
         "-frames:v", "1", str(png)],
        check=True,
    )
    with pytest.raises(UnsupportedMediaType) as err:
        decode_audio(png.read_bytes())
    assert err.value.status == 415 and err.value.code == "unsupported_media_type"
    assert "without an audio stream" in err.value.message


@needs_ffmpeg
def test_truncated_known_containers_are_400(tmp_path):
    wav = wav_bytes(tone(440, 2.0, 16000), 16000)
    m4a = ffmpeg_encode(tmp_path, wav, ["-c:a", "aac"], ".m4a")  # index at the end
    before = leftover_temp_dirs()
    for truncated in (wav[:30], m4a[: len(m4a) // 2], b"fLaC\x00\x00", b"OggS\x00\x02garbage"):
        with pytest.raises(InvalidAudio) as err:
            decode_audio(truncated)
        assert (err.value.status, err.value.code) == (400, "undecodable_audio")
    assert leftover_temp_dirs() == before


@needs_ffmpeg
def test_video_without_audio_is_415(tmp_path):
    video = tmp_path / "video.mp4"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
         "testsrc=size=64x64:rate=10:duration=1", "-c:v", "mpeg4", str(video)],
        check=True,
    )
    with pytest.raises(UnsupportedMediaType) as err:
        decode_audio(video.read_bytes())
    assert err.value.status == 415 and "mov" in err.value.message


def test_truncated_wav_decodes_what_is_there():
    wav = wav_bytes(tone(440, 2.0, 16000), 16000)
    audio = decode_audio(wav[: 44 + 16000 * 2])  # header + the first second
    assert audio.duration_s == pytest.approx(1.0, abs=0.001)
    assert peaks_hz(audio.samples) == pytest.approx([440], abs=2)


def test_zero_sample_wav():
    with pytest.raises(InvalidAudio) as err:
        decode_audio(wav_bytes(np.zeros(0, np.float32), 16000))
    assert (err.value.status, err.value.code) == (400, "zero_length_audio")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_samples_are_rejected(bad):
    x = tone(440, 1.0, 44100)
    x[1000] = bad
    with pytest.raises(InvalidAudio) as err:
        decode_audio(wav_bytes(np.stack([x, x], axis=1), 44100, "FLOAT"))
    assert (err.value.status, err.value.code) == (400, "invalid_samples")


def test_too_long_from_the_header_is_413_before_reading():
    wav = wav_bytes(tone(440, 12.0, 16000), 16000)
    with pytest.raises(AudioTooLong) as err:
        decode_audio(wav, max_duration_s=10)
    assert err.value.status == 413 and err.value.code == "audio_too_long"
    assert "12.0 s" in err.value.message and "10 s" in err.value.message
    assert decode_audio(wav, max_duration_s=12).duration_s == 12.0  # the limit itself is fine


@needs_ffmpeg
@pytest.mark.parametrize("args, suffix", [(["-c:a", "aac"], ".m4a"), (["-c:a", "libmp3lame"], ".mp3")])
def test_codec_padding_at_the_limit_is_not_too_long(tmp_path, args, suffix):
    data = ffmpeg_encode(tmp_path, wav_bytes(tone(440, 10.0, 44100), 44100), args, suffix)
    audio = decode_audio(data, max_duration_s=10)
    assert 10.0 <= audio.duration_s <= 10.05


def _flac_claiming(seconds: float, rate: int = 16000) -> bytes:
    """A 1 s FLAC whose STREAMINFO says it holds `seconds`."""
    data = bytearray(wav_bytes(tone(440, 1.0, rate), rate, "PCM_16", "FLAC"))
    # STREAMINFO starts at byte 8; total samples are the low 36 bits of bytes 21..25.
    packed = int.from_bytes(data[21:26], "big")
    packed = (packed & ~((1 << 36) - 1)) | int(seconds * rate)
    data[21:26] = packed.to_bytes(5, "big")
    return bytes(data)


def test_header_claiming_ten_hours_does_not_allocate_them():
    lying = _flac_claiming(10 * 3600)
    assert sf.info(io.BytesIO(lying)).duration == 36000  # libsndfile believes the header
    with pytest.raises(AudioTooLong) as err:
        decode_audio(lying, max_duration_s=3600)
    assert "36000.0 s" in err.value.message
    tracemalloc.start()
    try:
        audio = decode_audio(lying)  # no limit: reads what is really there
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert audio.duration_s == pytest.approx(1.0, abs=0.001)
    assert peak < 50e6  # 10 h at 16 kHz would be 2.3 GB


def test_wav_header_claiming_ten_hours():
    data = bytearray(wav_bytes(tone(440, 1.0, 16000), 16000))
    claimed = 10 * 3600 * 16000 * 2
    struct.pack_into("<I", data, 4, claimed + 36)
    struct.pack_into("<I", data, data.find(b"data") + 4, claimed)
    audio = decode_audio(bytes(data), max_duration_s=60)  # libsndfile trusts the file size
    assert audio.duration_s == pytest.approx(1.0, abs=0.001)


@needs_ffmpeg
def test_too_long_via_ffmpeg_is_413_with_the_real_duration(tmp_path):
    data = ffmpeg_encode(tmp_path, wav_bytes(tone(440, 8.0, 16000), 16000), ["-c:a", "aac"], ".m4a")
    with pytest.raises(AudioTooLong) as err:
        decode_audio(data, max_duration_s=5)
    assert "8.0 s" in err.value.message and "5 s" in err.value.message


@needs_ffmpeg
def test_compressed_hour_of_silence_stops_at_the_limit(tmp_path):
    # Zip-bomb style: an hour of FLAC-in-Matroska silence is a few hundred KB; the
    # decode must stop just past the limit instead of producing 230 MB of samples.
    bomb = tmp_path / "silence.mkv"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
         "anullsrc=r=16000:cl=mono", "-t", "3600", "-c:a", "flac", str(bomb)],
        check=True,
    )
    assert bomb.stat().st_size < 5e6
    started = time.perf_counter()
    with pytest.raises(AudioTooLong) as err:
        decode_audio(bomb.read_bytes(), max_duration_s=30)
    assert time.perf_counter() - started < 5
    assert "3600.0 s" in err.value.message


@needs_ffmpeg
def test_ffmpeg_timeout_leaves_no_temp_files(tmp_path):
    data = ffmpeg_encode(tmp_path, wav_bytes(tone(440, 5.0, 16000), 16000), ["-c:a", "aac"], ".m4a")
    before = leftover_temp_dirs()
    with pytest.raises(InvalidAudio) as err:
        decode_audio(data, ffmpeg_timeout_s=0.001)
    assert err.value.code == "decode_timeout"
    assert leftover_temp_dirs() == before


@needs_ffmpeg
def test_missing_ffmpeg_is_named(tmp_path, monkeypatch):
    m4a = ffmpeg_encode(tmp_path, wav_bytes(tone(440, 1.0, 16000), 16000), ["-c:a", "aac"], ".m4a")
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without ffmpeg
    with pytest.raises(UnsupportedMediaType) as err:
        decode_audio(m4a)
    assert err.value.status == 415
    assert "ffmpeg is required to decode m4a" in err.value.message
    with pytest.raises(InvalidAudio):
        decode_audio(b"plain text, not audio")
    assert decode_audio(wav_bytes(tone(440, 1.0, 16000), 16000)).duration_s == 1.0


@needs_ffmpeg
def test_real_speech_decodes_alike_on_both_paths(tmp_path, shared_audio):
    # jfk.flac (16 kHz mono) re-encoded as 44.1 kHz stereo ALAC: ffmpeg's resampler and
    # downmix must give back the same speech as libsndfile's direct read.
    original = decode_audio((shared_audio / "jfk" / "jfk.flac").read_bytes())
    assert original.decoder == "soundfile" and original.duration_s == pytest.approx(11.0, abs=0.01)
    data = ffmpeg_encode(
        tmp_path, (shared_audio / "jfk" / "jfk.flac").read_bytes(),
        ["-ar", "44100", "-ac", "2", "-c:a", "alac"], ".m4a",
    )
    again = decode_audio(data)
    assert again.decoder == "ffmpeg" and (again.source_rate, again.channels) == (44100, 2)
    n = min(len(original.samples), len(again.samples))
    assert abs(len(original.samples) - len(again.samples)) <= 16  # within 1 ms
    correlation = np.corrcoef(original.samples[:n], again.samples[:n])[0, 1]
    assert correlation > 0.999
    assert level(again.samples) == pytest.approx(level(original.samples), rel=0.01)
