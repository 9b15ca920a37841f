"""Generated audio and degradations of speech, for the evaluation sets and checks.

Every function takes and returns mono float32 at 16 kHz (SR), shape (n_samples,), and is
deterministic given its seed. Levels are in dBFS of the RMS over the loud frames (the
frames within 40 dB of the loudest), so that pauses do not lower a clip's level and
noise is mixed against the speech, not against its silences.
"""

from typing import Sequence

import numpy as np

SR = 16000
FRAME = 400  # 25 ms, the unit of the level measurement

# ---------------------------------------------------------------- generated audio


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def white_noise(seconds: float, rms: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(int(seconds * SR)) * rms
    return np.clip(noise, -1, 1).astype(np.float32)


def coloured_noise(seconds: float, exponent: float, seed: int = 0) -> np.ndarray:
    """Noise whose power falls as 1/f**exponent (1: pink, 2: brown), above 20 Hz, RMS 0.1."""
    n = int(seconds * SR)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spectrum *= np.where(f >= 20, np.maximum(f, 20) ** (-exponent / 2), 0.0)
    noise = np.fft.irfft(spectrum, n)
    return (0.1 * noise / (np.sqrt(np.mean(noise ** 2)) + 1e-12)).astype(np.float32)


def hum(seconds: float, mains_hz: float = 50.0, seed: int = 0) -> np.ndarray:
    """Mains hum (fundamental and odd harmonics) over a little white noise, RMS about 0.1."""
    t = np.arange(int(seconds * SR)) / SR
    tone = sum(np.sin(2 * np.pi * mains_hz * k * t + k) / k for k in (1, 3, 5, 7))
    out = tone / np.sqrt(np.mean(tone ** 2)) * 0.1 + white_noise(seconds, 0.01, seed)
    return out.astype(np.float32)


def rumble(seconds: float, seed: int = 1) -> np.ndarray:
    """50 Hz hum over brown noise with its slow drift removed (energy below ~200 Hz)."""
    n = int(seconds * SR)
    brown = np.cumsum(np.random.default_rng(seed).standard_normal(n))
    brown -= np.convolve(brown, np.ones(1601) / 1601, mode="same")
    tone = np.sin(2 * np.pi * 50 * np.arange(n) / SR)
    return np.clip(0.3 * tone + 0.2 * brown / np.abs(brown).max(), -1, 1).astype(np.float32)


def clicks(seconds: float, per_minute: int = 120, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    out = np.zeros(n)
    shape = np.exp(-np.arange(40) / 8)
    for at in rng.integers(0, n - 40, int(per_minute * seconds / 60)):
        out[at: at + 40] += rng.choice([-0.8, 0.8]) * shape
    return np.clip(out, -1, 1).astype(np.float32)


def chords(seconds: float, chord_s: float = 2.0) -> np.ndarray:
    """Major/minor triads with three harmonics each, struck every `chord_s` seconds."""
    n = int(seconds * SR)
    out = np.zeros(n)
    roots = (261.63, 220.0, 174.61, 196.0)  # C, A minor, F, G
    thirds = (1.26, 1.19, 1.26, 1.26)
    per = int(chord_s * SR)
    for k in range(-(-n // per)):
        t = np.arange(min(per, n - k * per)) / SR
        envelope = np.exp(-1.5 * t)
        for ratio in (1.0, thirds[k % 4], 1.5):
            for h in (1, 2, 3):
                out[k * per: k * per + len(t)] += envelope * np.sin(2 * np.pi * roots[k % 4] * ratio * h * t) / h
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


def babble(seconds: float, talkers: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """Several talkers at once: each of `talkers` (speech clips) looped from a random
    offset to `seconds`, levelled to the same RMS and summed; RMS 0.1."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    out = np.zeros(n)
    for clip in talkers:
        looped = np.resize(np.roll(clip, -int(rng.integers(len(clip)))), n)
        out += looped / (loud_rms(clip) + 1e-12)
    return (0.1 * out / (np.sqrt(np.mean(out ** 2)) + 1e-12)).astype(np.float32)


# ---------------------------------------------------------------- levels


def loud_rms(x: np.ndarray) -> float:
    """RMS over the 25 ms frames within 40 dB of the loudest (the whole clip if shorter)."""
    frames = x[: len(x) // FRAME * FRAME].reshape(-1, FRAME) if len(x) >= FRAME else x[None, :]
    power = np.mean(frames.astype(np.float64) ** 2, axis=1)
    if power.max() <= 0:
        return 0.0
    return float(np.sqrt(np.mean(power[power >= power.max() * 1e-4])))


def level_dbfs(x: np.ndarray) -> float:
    return 20 * np.log10(max(loud_rms(x), 1e-10))


def set_level(x: np.ndarray, dbfs: float) -> np.ndarray:
    """`x` scaled so that its loud-frame RMS is `dbfs` (e.g. -30: a quiet recording)."""
    return (x * (10 ** (dbfs / 20) / max(loud_rms(x), 1e-10))).astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """`speech` plus `noise` (looped or cut to its length) scaled to `snr_db` below the
    speech's loud-frame level; the sum is scaled down only if it would clip."""
    noise = np.resize(noise, len(speech)).astype(np.float64)
    noise *= loud_rms(speech) / (np.sqrt(np.mean(noise ** 2)) + 1e-12) / 10 ** (snr_db / 20)
    out = speech + noise
    peak = np.abs(out).max()
    return (out / peak * 0.99 if peak > 0.99 else out).astype(np.float32)


# ---------------------------------------------------------------- degradations


def change_speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Played `factor` times faster, pitch moving with it (as Kaldi's speed perturbation
    and sox's `speed`): the samples resampled from SR * factor to SR."""
    import soxr

    return soxr.resample(x, SR * factor, SR, quality="HQ").astype(np.float32)


def room_impulse(rt60_s: float, seed: int = 0, direct_to_reverb_db: float = 3.0) -> np.ndarray:
    """A synthetic room impulse response: a direct path, then Gaussian noise decaying by
    60 dB over `rt60_s` seconds, low-passed a little by the walls; shape (rt60_s * SR,)."""
    rng = np.random.default_rng(seed)
    n = int(rt60_s * SR)
    t = np.arange(n) / SR
    tail = rng.standard_normal(n) * 10 ** (-3 * t / rt60_s)
    tail = np.convolve(tail, np.ones(4) / 4, mode="same")
    tail[: int(0.002 * SR)] = 0  # the first reflection arrives ~2 ms after the direct path
    tail *= 10 ** (-direct_to_reverb_db / 20) / (np.sqrt(np.sum(tail ** 2)) + 1e-12)
    tail[0] = 1.0
    return tail


def reverberate(x: np.ndarray, rt60_s: float, seed: int = 0) -> np.ndarray:
    """`x` heard in a room with reverberation time `rt60_s`, at the level it had."""
    from scipy.signal import fftconvolve

    wet = fftconvolve(x, room_impulse(rt60_s, seed))[: len(x)]
    wet *= loud_rms(x) / (loud_rms(wet) + 1e-12)
    peak = np.abs(wet).max()
    return (wet / peak * 0.99 if peak > 0.99 else wet).astype(np.float32)


def telephone(x: np.ndarray) -> np.ndarray:
    """A narrow-band call: band-passed to 300-3400 Hz and resampled to 8 kHz, shape
    (len(x) // 2,). Write it as 8 kHz mu-law WAV (soundfile subtype ULAW) to add the
    codec's 8-bit quantization, as a phone system's recording has it."""
    import soxr
    from scipy.signal import butter, sosfiltfilt

    band = sosfiltfilt(butter(6, (300, 3400), btype="bandpass", fs=SR, output="sos"), x)
    band = soxr.resample(band, SR, 8000, quality="HQ")
    peak = np.abs(band).max()
    return (band / peak * 0.99 if peak > 0.99 else band).astype(np.float32)


def concatenate(clips: Sequence[np.ndarray], gaps_s: Sequence[float], floor_rms: float = 0.0,
                seed: int = 0) -> np.ndarray:
    """clips[0], a pause of gaps_s[0], clips[1], ...; the pauses hold white noise of RMS
    `floor_rms` (0: digital silence), as a room's background does."""
    parts = []
    for k, clip in enumerate(clips):
        parts.append(clip)
        if k < len(gaps_s):
            parts.append(white_noise(gaps_s[k], floor_rms, seed + k) if floor_rms else silence(gaps_s[k]))
    return np.concatenate(parts).astype(np.float32)
