"""The dev set's degradations do what their names say (scripts/augment.py), and the set
built from ../shared/audio holds the conditions and the words issue #20 asks for
(scripts/build_devset.py). No model."""

import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import augment  # noqa: E402
import build_devset  # noqa: E402

SR = augment.SR


def tone(hz: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def speech_like(seconds: float = 6.0, amplitude: float = 0.5) -> np.ndarray:
    """Bursts of a tone with silent pauses between them (a third of the time silent)."""
    x = tone(300, seconds, amplitude)
    for start in np.arange(0, seconds, 1.5):
        x[int((start + 1.0) * SR): int((start + 1.5) * SR)] = 0
    return x


def peak_hz(x: np.ndarray, rate: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def band_power(x: np.ndarray, low: float, high: float, rate: int = SR) -> float:
    f = np.fft.rfftfreq(len(x), 1 / rate)
    return float(np.sum(np.abs(np.fft.rfft(x))[(f >= low) & (f < high)] ** 2))


@pytest.mark.parametrize("snr_db", [0, 5, 10, 20])
def test_noise_is_mixed_at_the_snr_against_the_speech_not_its_pauses(snr_db):
    speech = speech_like(amplitude=0.1)  # no clipping at 0 dB
    mixed = augment.mix_at_snr(speech, augment.white_noise(3.0, 0.1, seed=1), snr_db)
    assert mixed.shape == speech.shape and mixed.dtype == np.float32  # noise looped to the length
    noise = mixed - speech
    measured = 20 * np.log10(augment.loud_rms(speech) / np.sqrt(np.mean(noise ** 2)))
    assert measured == pytest.approx(snr_db, abs=0.1)


def test_a_mix_that_would_clip_is_scaled_down_keeping_its_snr():
    speech = tone(300, 2.0, amplitude=0.95)
    mixed = augment.mix_at_snr(speech, augment.white_noise(2.0, 0.1, seed=2), 0)
    assert np.abs(mixed).max() <= 0.99 + 1e-6
    scale = np.dot(mixed, speech) / np.dot(speech, speech)
    noise = mixed - scale * speech
    assert 20 * np.log10(augment.loud_rms(scale * speech) / np.sqrt(np.mean(noise ** 2))) == pytest.approx(0, abs=0.3)


def test_quiet_sets_the_speech_level_whatever_the_pauses():
    quiet = augment.set_level(speech_like(), -30.0)
    assert augment.level_dbfs(quiet) == pytest.approx(-30.0, abs=0.01)
    assert augment.level_dbfs(augment.silence(1.0)) < -150  # no division by zero on silence


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_changes_duration_and_pitch_together(factor):
    x = tone(1000, 3.0)
    faster = augment.change_speed(x, factor)
    assert len(faster) == pytest.approx(len(x) / factor, abs=2)
    assert peak_hz(faster) == pytest.approx(1000 * factor, rel=0.01)


def test_telephone_is_8khz_and_keeps_only_the_voice_band():
    noise = augment.white_noise(4.0, 0.1, seed=3)
    call = augment.telephone(noise)
    assert len(call) == len(noise) // 2  # 8 kHz
    per_hz_in = band_power(call, 500, 3000, 8000) / 2500
    assert band_power(call, 0, 150, 8000) / 150 < per_hz_in / 100  # below the band: -20 dB and more
    assert band_power(call, 3800, 4000, 8000) / 200 < per_hz_in / 100  # above it


def test_reverb_keeps_the_level_and_decays_over_rt60():
    impulse = augment.room_impulse(0.5, seed=4)
    assert len(impulse) == SR // 2 and impulse[0] == 1.0
    energy = impulse[1:] ** 2
    tenth = len(energy) // 10
    assert 10 * np.log10(energy[-tenth:].sum() / energy[:tenth].sum()) < -40  # ~-54 dB over 0.45 s
    x = speech_like()
    wet = augment.reverberate(x, 0.5, seed=4)
    assert wet.shape == x.shape
    assert augment.level_dbfs(wet) == pytest.approx(augment.level_dbfs(x), abs=0.5)
    assert np.abs(wet[int(1.05 * SR): int(1.1 * SR)]).max() > 0.01  # the first pause now rings


def test_noise_colours_have_their_spectral_slopes():
    per_octave = {}
    for exponent in (0.0, 1.0, 2.0):
        x = augment.coloured_noise(10.0, exponent, seed=5)
        assert np.sqrt(np.mean(x ** 2)) == pytest.approx(0.1, rel=1e-3)
        per_octave[exponent] = 10 * np.log10(band_power(x, 2000, 4000) / band_power(x, 1000, 2000))
    assert per_octave[0.0] == pytest.approx(3.0, abs=0.5)  # white: twice the bandwidth
    assert per_octave[1.0] == pytest.approx(0.0, abs=0.5)  # pink: equal power per octave
    assert per_octave[2.0] == pytest.approx(-3.0, abs=0.5)  # brown


def test_babble_sums_talkers_and_is_deterministic():
    talkers = [speech_like(2.0), tone(500, 3.0), tone(800, 1.0)]
    a, b = augment.babble(5.0, talkers, seed=6), augment.babble(5.0, talkers, seed=6)
    assert np.array_equal(a, b) and len(a) == 5 * SR
    assert np.sqrt(np.mean(a ** 2)) == pytest.approx(0.1, rel=1e-3)
    assert all(band_power(a, hz - 20, hz + 20) > 0.01 * band_power(a, 0, SR / 2) for hz in (300, 500, 800))


def test_concatenation_puts_the_pauses_between_the_clips():
    a, b = tone(300, 1.0), tone(600, 0.5)
    joined = augment.concatenate([a, b], [2.0])
    assert len(joined) == int(3.5 * SR) and not joined[SR: 3 * SR].any()
    floor = augment.concatenate([a, b], [2.0], floor_rms=0.001)
    assert np.sqrt(np.mean(floor[SR: 3 * SR] ** 2)) == pytest.approx(0.001, rel=0.05)


def test_the_dev_set_holds_every_condition_and_enough_words(shared_audio):
    clips = build_devset.read_clips(shared_audio)
    items = build_devset.plan(clips)
    conditions = {i.condition for i in items}
    assert conditions == {"clean", "noise-0dB", "noise-5dB", "noise-10dB", "noise-20dB", "speed-0.9", "speed-1.1",
                          "reverb", "telephone", "quiet", "long"}
    assert len({i.file for i in items}) == len(items)
    references = {c.file: c.reference for c in clips}
    words = sum(len(references[i.source].split()) for i in items if i.condition != "long")
    long = [i for i in items if i.condition == "long"]
    made = [item.make() for item in long]
    words += sum(len(reference.split()) for _, reference in made)
    assert words >= 5000
    noise_types = {i.stem.rsplit("-", 1)[1] for i in items if i.condition.startswith("noise-")}
    assert noise_types == set(build_devset.NOISE_TYPES)
    short_words = sum(len(c.reference.split()) for c in clips
                      if c.file.split("/")[0] in ("jfk", "librispeech", "english"))
    for samples, reference in made:  # every short English clip once, with pauses between
        assert len(reference.split()) == short_words
        assert len(samples) / SR > sum(len(c.samples) for c in clips
                                       if c.file.split("/")[0] in ("jfk", "librispeech", "english")) / SR + 0.3 * 13
