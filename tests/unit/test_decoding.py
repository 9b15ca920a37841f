"""The continuous decode batch gives openai-whisper's decode() tokens, token for token, at
temperature 0 on real 30 s windows (tiny.en): for a batch, for rows with prompts, and for
rows that join a batch already decoding; sampled rows depend only on their own seed."""

import pytest
import torch

from conftest import SHARED_AUDIO as AUDIO

whisper = pytest.importorskip("whisper")
from whisper.tokenizer import get_tokenizer  # noqa: E402

from decoding import ALL_ROWS, DecodeBatch, TokenRules  # noqa: E402
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


def test_rows_without_timestamps_match_whisper_decode_beside_rows_with(model, mels):
    """A row whose prompt ends in <|notimestamps|> decodes as whisper.decode(without_timestamps
    =True), token for token, in the same batch as rows with timestamps (which stay as
    whisper.decode decodes them)."""
    options = dict(temperature=0, fp16=False, language="en")
    plain = whisper.decode(model, mels, whisper.DecodingOptions(without_timestamps=True, **options))
    timed = whisper.decode(model, mels, whisper.DecodingOptions(**options))
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels)
    text_only = list(tokenizer.sot_sequence_including_notimestamps)
    rows = [text_only, tokenizer.sot_sequence] * (len(FILES) // 2)  # alternating rows
    ours = decode_windows(model, features, rows, tokenizer, rules)
    for k, (got, row) in enumerate(zip(ours, rows)):
        ref = (plain if row == text_only else timed)[k]
        assert got.tokens == ref.tokens, k
        assert got.text == ref.text
        assert got.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)
        assert got.no_speech_prob == pytest.approx(ref.no_speech_prob, abs=1e-4)
    assert not any(t >= tokenizer.timestamp_begin for o in ours[::2] for t in o.tokens)
    assert all(any(t >= tokenizer.timestamp_begin for t in o.tokens) for o in ours[1::2])


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
    with torch.no_grad():
        features = model.encoder(mels[:2])
    ours = decode_windows(model, features, [tokenizer.sot_sequence] * 2, tokenizer, rules,
                          temperatures=1.0, seeds=[0, 1], max_new_tokens=60)
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
    batch.add(features[:1], initial[:1], [0.0], [0], [0])
    got.update(batch.step(5))
    batch.add(features[1:3], initial[1:3], [0.0, 0.0], [1, 2], [1, 2])  # join mid-decode
    got.update(batch.step(7))
    batch.add(features[3:], initial[3:], [0.0], [3], [3])
    while len(batch):
        got.update(batch.step(3))
    assert [got[i].tokens for i in range(4)] == alone


def test_a_sampled_row_depends_only_on_its_own_seed(model, mels):
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels)
    initial = [tokenizer.sot_sequence] * 4

    def sampled_first_row(neighbours: int, seed: int = 7, tokens_per_step: int = 16):
        temps = [0.8] + [1.0] * neighbours
        return decode_windows(model, features[: 1 + neighbours], initial[: 1 + neighbours], tokenizer,
                              rules, temperatures=temps, seeds=[seed] + [100 + k for k in range(neighbours)],
                              max_new_tokens=60, tokens_per_step=tokens_per_step)[0].tokens

    alone = sampled_first_row(0)
    # the same among neighbours and in other chunkings of the tokens; another seed differs
    assert alone == sampled_first_row(3) == sampled_first_row(3, tokens_per_step=5)
    assert alone != sampled_first_row(0, seed=8)


def _syncs_per_chunk(model, features, tokenizer, rules, temperatures, tokens):
    batch = DecodeBatch(model, tokenizer, rules)
    batch.add(features, [tokenizer.sot_sequence] * len(temperatures), temperatures, range(len(temperatures)),
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
        runner.batch.add(features, [sot] * len(mels), [0.0] * len(mels), list(range(len(mels))), range(len(mels)))
        done = {}
        while runner.decoding:
            done.update((tag, result.tokens) for tag, result in runner.decode(16))
        return [done[k] for k in range(len(mels))]

    assert tokens(torch.float16) == tokens(torch.float32)


def test_the_graphs_sampling_path_gives_the_eager_tokens(model, mels):
    """A CUDA graph samples with noise computed for every row, masked by temperature
    (ALL_ROWS); eagerly only the sampled rows get noise. Forced here on the CPU (a batch
    that believes it replays graphs and has none captured runs that path eagerly), both
    give the same tokens, greedy and sampled rows mixed."""
    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels)
    temperatures = [0.0, 0.6, 0.0, 1.0]

    def run(graph_path: bool):
        batch = DecodeBatch(model, tokenizer, rules, max_new_tokens=60, graph_api=object() if graph_path else None,
                            cuda_graphs=graph_path)
        assert batch.cuda_graphs is graph_path
        batch.add(features, [tokenizer.sot_sequence] * 4, temperatures, [5, 6, 7, 8], range(4))
        got = {}
        while len(batch):
            got.update(batch.step(8))
        return [got[k].tokens for k in range(4)]

    assert run(True) == run(False)


def test_gumbel_noise_is_a_function_of_seed_step_and_token():
    from decoding import _mix32, gumbel_noise

    keys = _mix32(torch.arange(1000))
    a = gumbel_noise(torch.tensor([7, 8]), torch.tensor([3, 3]), keys)
    b = gumbel_noise(torch.tensor([8, 7, 7]), torch.tensor([3, 3, 4]), keys)
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) and not torch.equal(a[0], b[2])
    assert torch.isfinite(a).all()
    # Gumbel(0, 1): mean 0.5772, variance pi^2 / 6
    big = gumbel_noise(torch.arange(200), torch.zeros(200, dtype=torch.long), keys).flatten()
    assert abs(big.mean().item() - 0.5772) < 0.02 and abs(big.var().item() - 1.6449) < 0.05


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
    batch.add(features[:2], initial[:2], [0.0, 0.0], [0, 1], [0, 1])
    batch.add(features[2:], initial[2:], [0.0], [2], [2])  # three rows: a bucket of four
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
    batch.add(features, [tokenizer.sot_sequence] * 2, [0.0, 0.0], [0, 1], [0, 1])
    before = {name: t.data_ptr() for name, t in batch.state.items()}
    caches = [t.data_ptr() for t in batch._buffers()]
    position = batch.state["next_position"].clone()
    with torch.no_grad():
        for sampled in (None, ALL_ROWS, None):  # greedy, and the graphs' sampling path
            batch._token_step(2, batch._span(3), sampled)
    assert {name: t.data_ptr() for name, t in batch.state.items()} == before
    assert [t.data_ptr() for t in batch._buffers()] == caches
    assert (batch.state["next_position"] == position + 3).all()  # the counters moved on the device


def test_a_token_step_copies_no_cache(model, mels):
    """The self-attention cache is head-major: attention reads its (rows, heads, span)
    slices in place. No op of a token step copies more than a row's worth per row."""
    from torch.utils._python_dispatch import TorchDispatchMode

    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    with torch.no_grad():
        features = model.encoder(mels)
    batch = DecodeBatch(model, tokenizer, rules)
    batch.add(features, [tokenizer.sot_sequence] * 4, [0.0] * 4, range(4), range(4))

    class Copies(TorchDispatchMode):
        found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if any(op in name for op in ("clone", "copy", "contiguous")) and isinstance(out, torch.Tensor):
                self.found.append((name, out.numel()))
            return out

    with torch.no_grad(), Copies():
        batch._token_step(4, 64, None)
    row = model.dims.n_text_state
    assert not [(op, n) for op, n in Copies.found if n > 4 * row], Copies.found


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


class FakeGraphs:
    """torch.cuda's graph API as DecodeBatch uses it, on the CPU: capture contexts that
    succeed (the graph then replays the step it was captured for) or raise at exit, as
    torch.cuda.graph's capture_end does when a capture is invalidated."""

    def __init__(self, fail_at=None):
        self.fail_at, self.log, self.captures = fail_at, [], 0

    def graph(self):
        from types import SimpleNamespace

        return SimpleNamespace(pool=lambda: "pool", replay=None)

    def stream_context(self):
        log = self.log

        class Stream:
            def __enter__(self):
                log.append("stream in")

            def __exit__(self, *exc):
                log.append("stream out")

        return Stream()

    def capture(self, graph, pool):
        fake = self

        class Capture:
            def __enter__(self):
                fake.captures += 1

            def __exit__(self, *exc):
                if fake.captures == fake.fail_at:
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

        return Capture()

    def abandon(self, graph):
        self.log.append("abandoned")


def graph_batch(model, api):
    from decoding import CUDA_ROW_BUCKETS

    tokenizer = get_tokenizer(False, language="en", task="transcribe")
    rules = TokenRules(tokenizer, model.dims.n_vocab, model.dims.n_audio_ctx, "cpu")
    batch = DecodeBatch(model, tokenizer, rules, max_new_tokens=40, row_buckets=CUDA_ROW_BUCKETS, span_step=64,
                        cuda_graphs=True, graph_api=api)
    return batch, tokenizer


def test_graphs_are_captured_at_start_for_every_shape_and_replayed(model, mels):
    from functools import partial

    api = FakeGraphs()
    batch, tokenizer = graph_batch(model, api)
    with torch.no_grad():
        held = batch.capture_graphs(3, torch.float32)
        features = model.encoder(mels[:3])
    assert len(batch.slots) == 4 and held == len(batch.graphs) == 3 * 7 * 2  # buckets 1, 2, 4; 7 spans; sampling
    assert api.log == ["stream in", "stream out"] * held  # each capture on the capture stream, then back
    for (rows, span, sampling), graph in batch.graphs.items():
        graph.replay = partial(batch._token_step, rows, span, ALL_ROWS if sampling else None)
    batch.add(features, [tokenizer.sot_sequence] * 3, [0.0, 0.7, 0.0], [1, 2, 3], range(3))
    got = {}
    while len(batch):
        got.update(batch.step(8))
    assert batch.counts["graph_steps"] > 0 and batch.counts["eager_steps"] == 0
    eager = decode_windows(model, features, [tokenizer.sot_sequence] * 3, tokenizer, batch.rules,
                           temperatures=[0.0, 0.7, 0.0], seeds=[1, 2, 3], max_new_tokens=40)
    assert [got[k].tokens for k in range(3)] == [e.tokens for e in eager]


def test_a_failed_capture_restores_the_stream_and_leaves_the_batch_eager(model, mels, caplog):
    api = FakeGraphs(fail_at=5)
    batch, tokenizer = graph_batch(model, api)
    with torch.no_grad():
        assert batch.capture_graphs(3, torch.float32) == 0
        features = model.encoder(mels[:2])
    assert api.log[-3:] == ["stream in", "stream out", "abandoned"]  # restored even though capture_end raised
    assert not batch.graphs and not batch.cuda_graphs and batch.counts["capture_failures"] == 1
    assert [r.levelname for r in caplog.records if "CUDA graph failed" in r.getMessage()] == ["ERROR"]
    batch.add(features, [tokenizer.sot_sequence] * 2, [0.0, 0.0], [0, 1], range(2))
    while len(batch):
        batch.step(8)
    assert batch.counts["eager_steps"] > 0 and batch.counts["graph_steps"] == 0


def test_the_gpu_budget_counts_joins_and_rounds_down_to_a_bucket():
    """On an 80 GB card: each model's budget is a row bucket, its rows and one prefill of
    the windows joining together fit the memory the budget may take, and large-v3 (the
    review's case of a first full join at the card's size) is held to a small batch."""
    from whisper.model import ModelDimensions

    from decoding import CUDA_ROW_BUCKETS, PREFILL_ROWS
    from runner import gpu_window_budget, join_bytes, mels_bytes, window_bytes

    free = int(84.5e9)
    shapes = {
        "base": ModelDimensions(80, 1500, 512, 8, 6, 51865, 448, 512, 8, 6),
        "large-v3": ModelDimensions(128, 1500, 1280, 20, 32, 51866, 448, 1280, 20, 32),
    }
    budgets = {}
    for name, dims in shapes.items():
        budget = budgets[name] = gpu_window_budget("cuda", dims, 8 * 3600, free_bytes=free)
        assert budget in CUDA_ROW_BUCKETS
        peak = budget * window_bytes(dims) + min(budget, PREFILL_ROWS) * join_bytes(dims) + mels_bytes(dims, 8 * 3600)
        assert peak <= 0.5 * free
    assert budgets["base"] >= 512 and budgets["large-v3"] <= 64
