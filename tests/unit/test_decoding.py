"""The continuous decode batch gives openai-whisper's decode() tokens, token for token, at
temperature 0 on real 30 s windows (tiny.en): for a batch, for rows with prompts, and for
rows that join a batch already decoding; sampled rows depend only on their own generator."""

import pytest
import torch

from conftest import SHARED_AUDIO as AUDIO

whisper = pytest.importorskip("whisper")
from whisper.tokenizer import get_tokenizer  # noqa: E402

from decoding import DecodeBatch, TokenRules  # noqa: E402
from decode_checks import HostSyncs, decode_windows, syncs_in_token_loop  # noqa: E402  (scripts/)

FILES = ["jfk/jfk.flac", "english/mfa_acoustic_corpus.wav", "english/LJ002-0020.wav",
         "librispeech/test-clean/1221-135766-0001.wav"]


@pytest.fixture(scope="module")
def model(tiny_en_model):
    return tiny_en_model


@pytest.fixture(scope="module")
def mels():
    from audio import decode_audio

    out = []
    for name in FILES:
        samples = torch.from_numpy(decode_audio((AUDIO / name).read_bytes()).samples)
        out.append(whisper.log_mel_spectrogram(whisper.pad_or_trim(samples), 80))
    return torch.stack(out)


def test_matches_whisper_decode_token_for_token(model, mels):
    reference = whisper.decode(model, mels, whisper.DecodingOptions(temperature=0, fp16=False, language="en"))
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels)
    ours = decode_windows(model, features, [tokenizer.sot_sequence] * len(FILES), tokenizer, rules)
    for ref, got in zip(reference, ours):
        assert got.tokens == ref.tokens
        assert got.text == ref.text
        assert got.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)
        assert got.no_speech_prob == pytest.approx(ref.no_speech_prob, abs=1e-4)
    assert any(t >= tokenizer.timestamp_begin for t in ours[0].tokens)  # decoded with timestamps


def test_rows_with_prompts_of_different_lengths(model, mels):
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    prompt = "President Kennedy's inaugural address."
    reference = whisper.decode(
        model, mels[:2], whisper.DecodingOptions(temperature=0, fp16=False, language="en", prompt=prompt)
    )
    plain = whisper.decode(model, mels[2:3], whisper.DecodingOptions(temperature=0, fp16=False, language="en"))
    prompted = [tokenizer.sot_prev] + tokenizer.encode(" " + prompt) + list(tokenizer.sot_sequence)
    with torch.no_grad():
        features = model.encoder(mels[:3])
    ours = decode_windows(model, features, [prompted, prompted, tokenizer.sot_sequence], tokenizer, rules)
    assert [o.tokens for o in ours] == [r.tokens for r in reference] + [plain[0].tokens]


def test_sampling_at_temperature_keeps_timestamp_rules(model, mels):
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    generators = [torch.Generator().manual_seed(k) for k in range(2)]
    with torch.no_grad():
        features = model.encoder(mels[:2])
    ours = decode_windows(model, features, [tokenizer.sot_sequence] * 2, tokenizer, rules,
                          temperatures=1.0, generators=generators, max_new_tokens=60)
    for row in ours:
        stamps = [t for t in row.tokens if t >= tokenizer.timestamp_begin]
        assert stamps and stamps[0] <= tokenizer.timestamp_begin + 50  # first <= 1.0 s
        assert stamps == sorted(stamps)
        assert row.temperature == 1.0 and len(row.tokens) <= 60


def greedy_alone(model, features, initial, tokenizer, rules):
    return [decode_windows(model, features[i:i + 1], [initial[i]], tokenizer, rules)[0].tokens
            for i in range(len(initial))]


def test_rows_joining_a_running_batch_decode_as_alone(model, mels):
    """Rows added while others are mid-decode (different cache columns, prompts of other
    lengths) and rows leaving early do not change anyone's tokens."""
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    prompted = [tokenizer.sot_prev] + tokenizer.encode(" Kennedy, inaugural.") + list(tokenizer.sot_sequence)
    initial = [tokenizer.sot_sequence, prompted, tokenizer.sot_sequence, prompted]
    with torch.no_grad():
        features = model.encoder(mels)
    alone = greedy_alone(model, features, initial, tokenizer, rules)

    batch = DecodeBatch(model, tokenizer, rules)
    got = {}
    batch.add(features[:1], initial[:1], [0.0], [None], [0])
    got.update(batch.step(5))
    batch.add(features[1:3], initial[1:3], [0.0, 0.0], [None, None], [1, 2])  # join mid-decode
    got.update(batch.step(7))
    batch.add(features[3:], initial[3:], [0.0], [None], [3])
    while len(batch):
        got.update(batch.step(3))
    assert [got[i].tokens for i in range(4)] == alone


def test_a_sampled_row_depends_only_on_its_own_generator(model, mels):
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels)
    initial = [tokenizer.sot_sequence] * 4

    def sampled_first_row(neighbours: int):
        generators = [torch.Generator().manual_seed(7)] + [torch.Generator().manual_seed(100 + k)
                                                          for k in range(neighbours)]
        temps = [0.8] + [1.0] * neighbours
        return decode_windows(model, features[: 1 + neighbours], initial[: 1 + neighbours], tokenizer,
                              rules, temperatures=temps, generators=generators, max_new_tokens=60)[0].tokens

    assert sampled_first_row(0) == sampled_first_row(3)


def _syncs_per_chunk(model, features, tokenizer, rules, temperatures, tokens):
    batch = DecodeBatch(model, tokenizer, rules)
    generators = [torch.Generator().manual_seed(k) if t > 0 else None for k, t in enumerate(temperatures)]
    batch.add(features, [tokenizer.sot_sequence] * len(temperatures), temperatures, generators,
              range(len(temperatures)))
    batch.horizon = max(batch.horizon, tokens)
    with torch.no_grad():
        return syncs_in_token_loop(batch, tokens)


def test_no_host_sync_per_token_at_any_temperature(model, mels):
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels[:3])
    for temperatures in ([0.0, 0.0, 0.0], [0.0, 0.6, 1.0]):
        assert _syncs_per_chunk(model, features, tokenizer, rules, temperatures, 12) == []


def test_the_sync_counter_sees_a_sync():
    with HostSyncs() as counter:
        torch.ones(3).sum().item()
        torch.zeros(2).tolist()
        bool(torch.ones(1))
    assert counter.calls == ["item", "tolist", "__bool__"]


@pytest.mark.parametrize("layernorm", ["fp32", "fp16"])
def test_the_gpu_layout_decodes_as_fp32_on_cpu(model, mels, layernorm):
    """fp16 weights with fp32 LayerNorms, or fp16 throughout as the runner lays the model
    out on a GPU, run here on the CPU: the same tokens as fp32 on real windows."""
    from runner import ModelRunner

    def tokens(dtype):
        low = layernorm == "fp16" and dtype == torch.float16
        runner = ModelRunner(model, "cpu", dtype, low_precision_layernorm=low)
        assert {p.dtype for n, p in runner.model.named_parameters() if "ln" not in n} == {dtype}
        assert {p.dtype for n, p in runner.model.named_parameters() if "ln" in n} == {
            dtype if low else torch.float32}
        features = runner.encode(list(mels))
        sot = list(runner.tokenizer("en", "transcribe").sot_sequence)
        runner.batch.add(features, [sot] * len(mels), [0.0] * len(mels), [None] * len(mels), range(len(mels)))
        done = {}
        while runner.decoding:
            done.update((tag, result.tokens) for tag, result in runner.decode(16))
        return [done[k] for k in range(len(mels))]

    assert tokens(torch.float16) == tokens(torch.float32)


def test_sampling_without_generators_uses_torchs_own(model, mels):
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels[:1])
    torch.manual_seed(3)
    first = decode_windows(model, features, [tokenizer.sot_sequence], tokenizer, rules, temperatures=1.0)[0]
    torch.manual_seed(3)
    again = decode_windows(model, features, [tokenizer.sot_sequence], tokenizer, rules, temperatures=1.0)[0]
    assert first.temperature == 1.0 and first.tokens == again.tokens


def test_cuda_buckets_and_spans_on_cpu_decode_as_exact_sizes(model, mels):
    """The static step with cuda's row buckets (idle padding rows, compaction when the rows
    fit a smaller bucket) and 64-column attention spans gives the tokens of exact sizes,
    with rows joining and leaving; the step runs over whole buckets."""
    from decoding import CUDA_ROW_BUCKETS

    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    prompted = [tokenizer.sot_prev] + tokenizer.encode(" Kennedy, inaugural.") + list(tokenizer.sot_sequence)
    initial = [tokenizer.sot_sequence, prompted, tokenizer.sot_sequence]
    with torch.no_grad():
        features = model.encoder(mels[:3])
    alone = greedy_alone(model, features, initial, tokenizer, rules)

    batch = DecodeBatch(model, tokenizer, rules, row_buckets=CUDA_ROW_BUCKETS, span_step=64)
    got, rows_seen, moved = {}, set(), []
    compact = batch._compact
    batch._compact = lambda live: (moved.append([k for k in live if k >= batch._bucket(len(live))]), compact(live))
    batch.add(features[:2], initial[:2], [0.0, 0.0], [None, None], [0, 1])
    batch.add(features[2:], initial[2:], [0.0], [None], [2])  # three rows: a bucket of four
    while len(batch):
        rows_seen.add(batch._rows())
        got.update(batch.step(4))
    assert [got[i].tokens for i in range(3)] == alone
    assert 4 in rows_seen and rows_seen <= set(CUDA_ROW_BUCKETS)
    assert any(moved), "no row was moved down to a smaller bucket"


def test_a_token_step_writes_only_into_its_buffers(model, mels):
    """What CUDA graph capture needs: a chunk of tokens reads and writes the batch's buffers
    in place (same storage before and after), so a replayed graph sees the live state."""
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels[:2])
    batch = DecodeBatch(model, tokenizer, rules)
    batch.add(features, [tokenizer.sot_sequence] * 2, [0.0, 0.0], [None, None], [0, 1])
    before = {name: t.data_ptr() for name, t in batch.state.items()}
    caches = [t.data_ptr() for t in batch._buffers()]
    position = batch.state["next_position"].clone()
    with torch.no_grad():
        for _ in range(3):
            batch._token_step(2, batch._span(3), None, [])
    assert {name: t.data_ptr() for name, t in batch.state.items()} == before
    assert [t.data_ptr() for t in batch._buffers()] == caches
    assert (batch.state["next_position"] == position + 3).all()  # the counters moved on the device


def test_word_timestamps_of_many_windows_in_one_pass_match_whisper_per_window(model, mels):
    """The runner times the words of several windows with one decoder pass; each window's
    words are those of whisper.timing.add_word_timestamps run on that window alone (its own
    encoder pass from the mel); a window without text gets an empty word list."""
    import copy

    from whisper.timing import add_word_timestamps

    from runner import AlignmentWindow, ModelRunner

    runner = ModelRunner(model, "cpu", torch.float32)
    tokenizer = runner.tokenizer("en", "transcribe")
    features = runner.encode(list(mels))
    decoded = decode_windows(runner.model, features, [tokenizer.sot_sequence] * len(mels), tokenizer, runner.rules)
    ours = [[{"seek": 0, "start": 0.0, "end": 30.0, "tokens": d.tokens, "text": d.text}] for d in decoded]
    ours.append([{"seek": 0, "start": 0.0, "end": 1.0, "tokens": [tokenizer.timestamp_begin], "text": ""}])
    reference = copy.deepcopy(ours)
    passes = []
    hook = runner.model.decoder.register_forward_hook(lambda *_: passes.append(1))
    try:
        runner.add_word_timestamps([AlignmentWindow(segs, f, 3000, tokenizer, 0.0)
                                    for segs, f in zip(ours, list(features) + [features[0]])])
    finally:
        hook.remove()
    assert len(passes) == 1
    for segs, mel in zip(reference, list(mels) + [mels[0]]):
        add_word_timestamps(segments=segs, model=model, tokenizer=tokenizer, mel=mel, num_frames=3000,
                            last_speech_timestamp=0.0)
    for got, ref in zip(ours, reference):
        got_words, ref_words = got[0]["words"], ref[0]["words"]
        assert [w["word"] for w in got_words] == [w["word"] for w in ref_words]
        for g, r in zip(got_words, ref_words):
            assert g["start"] == pytest.approx(r["start"], abs=0.021)
            assert g["end"] == pytest.approx(r["end"], abs=0.021)
    assert sum(len(segs[0]["words"]) for segs in ours[:-1]) > 20 and ours[-1][0]["words"] == []
