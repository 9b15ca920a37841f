"""Continuous batched decoding of 30 s windows, with timestamps or without.

openai-whisper's `decode()` applies its timestamp rules with a Python loop over the
batch and a `.tolist()` per row and step, and a batch runs until its slowest row ends.
Here a `DecodeBatch` holds rows that decode side by side, each at its own temperature:
rows join between chunks of tokens (`add`: their prompts are prefilled and written into
free slots of the batch's fixed buffers), run `step(n)` tokens at a time, and leave as
soon as they end (`step` returns the finished rows), so a window that arrives while
others decode does not wait for them, and finished rows are refilled. Whisper's rules
(SuppressBlank, SuppressTokens, ApplyTimestampRules, greedy or sampled) are tensor
operations on the whole batch; there is no host sync inside a chunk, and the token step
has static shapes (captured as CUDA graphs on cuda, at start-up). At temperature 0 a row gets the same
tokens as `whisper.decode(..., DecodingOptions(temperature=0))`, whatever else shares its
batch.
"""

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from whisper.audio import CHUNK_LENGTH
from whisper.tokenizer import Tokenizer
from whisper.utils import compression_ratio

logger = logging.getLogger(__name__)


@dataclass
class DecodedWindow:
    """One row's result; the fields mean what they mean in whisper's DecodingResult."""

    tokens: List[int]  # sampled tokens, without the final <|endoftext|>
    text: str
    sum_logprob: float
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


class TokenRules:
    """The vocabulary facts the rules need; they are the same for every language and task
    of one model, so one instance serves a whole batch."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int, n_audio_ctx: int, device):
        self.eot = tokenizer.eot
        self.sot = tokenizer.sot
        self.timestamp_begin = tokenizer.timestamp_begin
        self.no_timestamps = tokenizer.no_timestamps
        self.no_speech = tokenizer.no_speech
        self.n_vocab = n_vocab

        # whisper's default suppress_tokens="-1" plus the special tokens it always adds
        suppress = set(tokenizer.non_speech_tokens)
        suppress.update(
            [tokenizer.transcribe, tokenizer.translate, tokenizer.sot,
             tokenizer.sot_prev, tokenizer.sot_lm]
        )
        if tokenizer.no_speech is not None:
            suppress.add(tokenizer.no_speech)
        # <|notimestamps|> is not here: ApplyTimestampRules drops it, so only rows with
        # timestamps do (apply_rules)
        self.suppress = torch.zeros(n_vocab, dtype=torch.bool)
        self.suppress[sorted(suppress)] = True
        self.suppress = self.suppress.to(device)

        # SuppressBlank: no leading blank and no empty output at the first step
        self.blank = torch.zeros(n_vocab, dtype=torch.bool)
        self.blank[tokenizer.encode(" ") + [tokenizer.eot]] = True
        self.blank = self.blank.to(device)

        precision = CHUNK_LENGTH / n_audio_ctx  # 0.02 s per timestamp token
        self.max_initial_timestamp_index = round(1.0 / precision)
        self.timestamp_index = torch.arange(n_vocab - self.timestamp_begin, device=device)
        self.vocab_keys = _mix32(torch.arange(n_vocab, dtype=torch.long, device=device))  # gumbel_noise


def apply_rules(
    rules: TokenRules,
    logits: Tensor,
    step: int,
    last: Tensor,
    penultimate: Tensor,
    last_timestamp: Tensor,
    timestamps_on: Tensor,
) -> None:
    """Mask `logits` (n_rows, n_vocab) in place the way whisper's logit filters do.

    last, penultimate: the last two sampled tokens per row (-1 where there is none);
    last_timestamp: the last sampled timestamp token per row (-1 where there is none);
    timestamps_on: per row, False where the row decodes without timestamps (its prompt
    ends in <|notimestamps|>): as whisper.decode(without_timestamps=True), no timestamp
    rule applies to it and <|notimestamps|> is not suppressed.
    """
    neg_inf = -np.inf
    ts_begin = rules.timestamp_begin

    if step == 0:
        logits.masked_fill_(rules.blank, neg_inf)
    logits.masked_fill_(rules.suppress, neg_inf)
    if rules.no_timestamps is not None:
        logits[:, rules.no_timestamps].masked_fill_(timestamps_on, neg_inf)

    # timestamps come in pairs, except directly before <|endoftext|>
    last_was_ts = last >= ts_begin
    penultimate_was_ts = (penultimate >= ts_begin) | (penultimate < 0)
    pair_open = last_was_ts & ~penultimate_was_ts & timestamps_on
    logits[:, : rules.eot].masked_fill_(pair_open[:, None], neg_inf)
    # timestamps never decrease, and a segment has a nonzero length; after a closed
    # pair no timestamp may follow at all
    floor = torch.where(pair_open, last_timestamp, last_timestamp + 1)
    floor = torch.where(last_timestamp >= 0, floor, torch.zeros_like(floor))
    floor = torch.where(last_was_ts & penultimate_was_ts, torch.full_like(floor, 1 << 30), floor)
    floor = torch.where(timestamps_on, floor, torch.zeros_like(floor))
    timestamps = logits[:, ts_begin:]
    timestamps.masked_fill_(rules.timestamp_index[None, :] < (floor - ts_begin)[:, None], neg_inf)

    if step == 0:
        # the first sampled token is a timestamp, no later than max_initial_timestamp
        logits[:, :ts_begin].masked_fill_(timestamps_on[:, None], neg_inf)
        logits[:, ts_begin + rules.max_initial_timestamp_index + 1 :].masked_fill_(timestamps_on[:, None], neg_inf)

    # when the timestamps together outweigh every text token, sample a timestamp;
    # compared on logits, as the log-softmax normalizer is the same on both sides
    timestamp_mass = timestamps.float().logsumexp(dim=-1)
    max_text = logits[:, :ts_begin].max(dim=-1).values.float()
    logits[:, :ts_begin].masked_fill_(((timestamp_mass > max_text) & timestamps_on)[:, None], neg_inf)


def _heads(x: Tensor, n_head: int) -> Tensor:
    return x.view(*x.shape[:2], n_head, -1).permute(0, 2, 1, 3)


def _attend(q, k, v, n_head, is_causal=False, mask=None):
    """Multi-head attention of q (rows, n_q, state) over k and v, which are (rows, n_k,
    state), or already head-major (rows, heads, n_k, state / heads); mask: boolean,
    broadcast to (rows, heads, n_q, n_k), True where a query may look.

    Two matmuls and an fp32 softmax rather than scaled_dot_product_attention: a decode
    step has one query per row, where the cpu's flash kernel is 1.3x slower in fp32 and
    6x slower in bf16 (16 rows over 1500 audio positions, docs/benchmarks.md)."""
    if k.dim() == 3:
        k, v = _heads(k, n_head), _heads(v, n_head)
    q = _heads(q, n_head)
    weights = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if is_causal:
        n_q, n_k = weights.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    if mask is not None:
        weights.masked_fill_(~mask, -np.inf)
    a = weights.softmax(dim=-1).to(v.dtype) @ v
    return a.permute(0, 2, 1, 3).flatten(start_dim=2)


def _decoder_forward(model, tokens: Tensor, positions: Tensor, store, cross_k, cross_v,
                     mask: Optional[Tensor], is_causal: bool) -> Tensor:
    """Run the text decoder on `tokens` (n_rows, n) at `positions` (n_rows, n); returns the
    hidden states after the final LayerNorm. store(layer, keys, values) keeps this call's
    self-attention keys/values (n_rows, n, state) and returns all those the queries attend
    over (as they are, or head-major); cross_k/cross_v: per layer (n_rows, heads,
    n_audio_ctx, state / heads)."""
    decoder = model.decoder
    x = (decoder.token_embedding(tokens) + decoder.positional_embedding[positions]).to(cross_k[0].dtype)
    for i, block in enumerate(decoder.blocks):
        attn = block.attn
        h = block.attn_ln(x)
        keys, values = store(i, attn.key(h), attn.value(h))
        x = x + attn.out(_attend(attn.query(h), keys, values, attn.n_head, is_causal=is_causal, mask=mask))
        cross = block.cross_attn
        h = block.cross_attn_ln(x)
        x = x + cross.out(_attend(cross.query(h), cross_k[i], cross_v[i], cross.n_head))
        x = x + block.mlp(block.mlp_ln(x))
    return decoder.ln(x)


def _logits(model, hidden: Tensor) -> Tensor:
    weight = model.decoder.token_embedding.weight.to(hidden.dtype)
    return (hidden @ weight.T).float()


MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (int64 tensors holding values below 2^32; every product stays
    below 2^63): the bits of a counter-based random number generator."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: Tensor, steps: Tensor, vocab_keys: Tensor) -> Tensor:
    """(rows, n_vocab) Gumbel(0, 1) noise, a pure function of each row's seed (int64), its
    token index `steps` and the token: the same numbers on any device, in any batch, in
    any chunking of the tokens, and computed by tensor ops alone (so inside a CUDA graph).
    vocab_keys: _mix32 of each token id (TokenRules.vocab_keys)."""
    key = _mix32((seeds & MASK32) ^ _mix32((seeds >> 32) & MASK32))
    key = _mix32(key ^ _mix32(steps & MASK32))
    bits = _mix32(key[:, None] ^ vocab_keys[None, :]) >> 8  # 24 bits: exact in fp32
    uniform = (bits.float() + 0.5) / float(1 << 24)  # in (0, 1)
    return -(-uniform.log()).log()


def _sample(logits: Tensor, state: dict, sampled, vocab_keys: Tensor) -> Tensor:
    """Greedy tokens for rows at temperature 0; a sampled row takes argmax(logits / T + G)
    with G the row's Gumbel noise (gumbel_noise): a sample from softmax(logits / T) that
    no other row can influence. `sampled`: None (no row samples), an index tensor of the
    rows that do, or ALL_ROWS (noise for every row, masked by temperature: the static
    shape a CUDA graph can hold; the same tokens)."""
    next_tokens = logits.argmax(dim=-1)
    if sampled is None:
        return next_tokens
    temperature = state["row_temperature"]
    if sampled is ALL_ROWS:
        noise = gumbel_noise(state["seed"], state["row_step"], vocab_keys)
        scores = torch.where(temperature > GREEDY, logits / temperature + noise, logits)
        return scores.argmax(dim=-1)
    noise = gumbel_noise(state["seed"].index_select(0, sampled), state["row_step"].index_select(0, sampled),
                         vocab_keys)
    scores = logits.index_select(0, sampled) / temperature.index_select(0, sampled) + noise
    return next_tokens.index_copy(0, sampled, scores.argmax(dim=-1))


ALL_ROWS = "all rows"  # _sample's `sampled` for a step that may hold sampled rows anywhere
GREEDY = 1e-6  # a greedy row's stored temperature (it divides nothing: argmax alone)


# Row counts a step runs at on cuda, one CUDA graph each (per attention span): rows that
# do not fill a bucket run as idle padding rows. On cpu every count is its own bucket.
CUDA_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256) + tuple(range(320, 4097, 64))
# Self-attention columns a step attends over come in multiples of this (its own graph each
# on cuda; on cpu a small step keeps masked columns few)
SPAN_STEP = {"cuda": 64, "cpu": 8}
PREFILL_ROWS = 128  # rows prefilled together when many join at once (their attention maps are the peak)


def row_bucket(n: int, buckets: Optional[Sequence[int]] = CUDA_ROW_BUCKETS) -> int:
    """The smallest bucket holding `n` rows (`n` itself past the last bucket, or without buckets)."""
    if not buckets or n > buckets[-1]:
        return n
    return next(b for b in buckets if b >= n)


@dataclass
class _Row:
    tag: Any
    temperature: float


class CudaGraphs:
    """torch.cuda's graph API, as DecodeBatch captures with it; tests stand in a fake to
    check what a failed capture leaves behind without a GPU."""

    def __init__(self, device):
        self.device = device
        self.stream = torch.cuda.Stream(device)  # every capture on it, restored after each

    def graph(self):
        return torch.cuda.CUDAGraph()

    def stream_context(self):
        return torch.cuda.stream(self.stream)

    def capture(self, graph, pool):
        return torch.cuda.graph(graph, pool=pool, stream=self.stream, capture_error_mode="thread_local")

    def abandon(self, graph) -> None:
        """After a capture that raised: stop routing allocations to the graph's private pool
        and release it, so the caching allocator is not left mid-capture (its next
        empty_cache would assert)."""
        try:
            pool = graph.pool()
        except Exception:
            return
        index = torch.device(self.device).index or 0
        for release in (torch._C._cuda_endAllocateToPool, torch._C._cuda_releasePool):
            try:
                release(index, pool)
            except Exception:  # already ended by capture_end
                pass
        torch.cuda.synchronize(self.device)


class DecodeBatch:
    """Rows decoding side by side, joining and leaving between chunks of tokens.

        batch = DecodeBatch(model, tokenizer, rules)
        batch.add(features, initial_tokens, temperatures, seeds, tags)
        while len(batch):
            for tag, result in batch.step(16): ...   # rows that ended in those 16 tokens

    features: (n, n_audio_ctx, n_audio_state); initial_tokens: per row [sot_prev, prompt...,]
    sot, [language, task], [no_timestamps] (a row whose tokens end in <|notimestamps|>
    decodes text only, as whisper.decode(without_timestamps=True)); a row at a temperature
    above 0 samples with Gumbel noise drawn from its seed, its token index and the token
    alone (gumbel_noise). Tags are the caller's: they come back with the results.

    The step is static: every row lives in a slot of fixed buffers (its self-attention cache
    is head-major, (heads, n_text_ctx, head width), so attention reads it without a copy;
    row r writes its token k at column k, and a boolean mask says which columns hold its
    keys), all per-row counters stay on the device, and a step runs over the first `rows`
    slots (a bucket) and the first `span` columns, both from a small set of sizes. So a
    joining row is written into a free slot (nothing else moves), a finished row frees its
    slot, and rows are compacted only when they fit a smaller bucket. Inside a chunk of
    tokens nothing waits for the device (tests/unit/test_decoding.py counts the host
    syncs). On cuda `capture_graphs` records every (rows, span, sampling) step shape up to
    the batch's capacity as CUDA graphs at start-up, largest first, in one pool; steps
    replay them (a shape without a graph runs eagerly and is counted, never captured while
    serving). A capture that fails switches the batch to eager steps for good, loudly.
    """

    def __init__(self, model, tokenizer: Tokenizer, rules: TokenRules, max_new_tokens: Optional[int] = None,
                 row_buckets: Optional[Sequence[int]] = None, span_step: Optional[int] = None,
                 cuda_graphs: Optional[bool] = None, graph_api=None):
        self.model, self.tokenizer, self.rules = model, tokenizer, rules
        self.device = rules.suppress.device
        cuda = self.device.type == "cuda"
        self.n_ctx = model.dims.n_text_ctx
        self.sample_len = max_new_tokens or self.n_ctx // 2
        self.row_buckets = tuple(row_buckets) if row_buckets else (CUDA_ROW_BUCKETS if cuda else None)
        self.span_step = span_step or SPAN_STEP["cuda" if cuda else "cpu"]
        self.cuda_graphs = cuda if cuda_graphs is None else bool(cuda_graphs and (cuda or graph_api))
        self._graph_api = graph_api
        self.slots: List[Optional[_Row]] = []  # None: a free slot
        self.state: dict = {}  # per-row tensors, (capacity, ...)
        self.self_k: List[Tensor] = []  # per layer (capacity, heads, n_ctx, state / heads)
        self.self_v: List[Tensor] = []
        self.cross_k: List[Tensor] = []  # per layer (capacity, heads, n_audio_ctx, state / heads)
        self.cross_v: List[Tensor] = []
        self.bound = 0  # no row in use writes its next token past this column
        self.horizon = 0  # tokens after which every row has ended
        self.graphs: dict = {}  # (rows, span, sampling) -> CUDA graph
        self._pool = None
        # token steps replayed from a graph, run eagerly, and failed captures (engine stats)
        self.counts = {"graph_steps": 0, "eager_steps": 0, "capture_failures": 0}

    def __len__(self) -> int:
        return sum(row is not None for row in self.slots)

    @property
    def tags(self) -> List[Any]:
        return [row.tag for row in self.slots if row is not None]

    # ------------------------------------------------------------------ sizes

    def _bucket(self, n: int) -> int:
        return row_bucket(n, self.row_buckets)

    def _rows(self) -> int:
        """The slots a step runs over: the bucket holding the highest slot in use."""
        used = [k for k, row in enumerate(self.slots) if row is not None]
        return self._bucket(used[-1] + 1) if used else 0

    def _span(self, tokens: int) -> int:
        step = self.span_step
        return min(self.n_ctx, -(-(self.bound + tokens) // step) * step)

    def _grow(self, capacity: int, dtype: torch.dtype) -> None:
        """Buffers for `capacity` rows, caches in `dtype` (the audio features'), the rows in
        use copied over. Allocates before it assigns: an out-of-memory error leaves the
        batch as it was. Graphs captured over the old buffers are dropped."""
        old = len(self.slots)
        dims, device = self.model.dims, self.device
        heads = self.model.decoder.blocks[0].cross_attn.n_head
        n_layers = len(self.model.decoder.blocks)
        width = dims.n_text_state // heads

        def rows(t: Optional[Tensor], shape, dtype, fill=0):
            new = torch.full((capacity, *shape), fill, dtype=dtype, device=device)
            if t is not None:
                new[:old] = t
            return new

        spec = {  # name: (shape, dtype, value of an unused row)
            "next_tokens": ((), torch.long, self.rules.eot), "next_position": ((), torch.long, 0),
            "key_mask": ((self.n_ctx,), torch.bool, False), "out_tokens": ((self.sample_len,), torch.long, 0),
            "row_step": ((), torch.long, 0), "n_steps": ((), torch.long, 0), "n_sampled": ((), torch.long, 0),
            "sum_logprobs": ((), torch.float32, 0.0), "no_speech": ((), torch.float32, 0.0),
            "last": ((), torch.long, -1), "penultimate": ((), torch.long, -1), "last_ts": ((), torch.long, -1),
            "done": ((), torch.bool, True), "row_temperature": ((1,), torch.float32, 1.0),
            "seed": ((), torch.long, 0), "timestamps_on": ((), torch.bool, True),
        }
        state = {name: rows(self.state.get(name), shape, dt, fill) for name, (shape, dt, fill) in spec.items()}
        state["key_mask"][old:, 0] = True  # an unused row attends to one column: no all -inf row
        cache = [[rows(t[k] if t else None, shape, dtype) for k in range(n_layers)]
                 for t, shape in ((self.self_k, (heads, self.n_ctx, width)),
                                  (self.self_v, (heads, self.n_ctx, width)),
                                  (self.cross_k, (heads, dims.n_audio_ctx, width)),
                                  (self.cross_v, (heads, dims.n_audio_ctx, width)))]
        self.state = state
        self.self_k, self.self_v, self.cross_k, self.cross_v = cache
        self.slots += [None] * (capacity - old)
        if self.graphs:
            logger.warning("decode batch grown to %d rows: its %d CUDA graphs are dropped", capacity, len(self.graphs))
        self.graphs.clear()  # they were captured over the old buffers
        self._pool = None

    def _buffers(self) -> List[Tensor]:
        return list(self.state.values()) + self.self_k + self.self_v + self.cross_k + self.cross_v

    # ------------------------------------------------------------------ joining

    @torch.no_grad()
    def add(self, audio_features: Tensor, initial_tokens: Sequence[Sequence[int]],
            temperatures: Sequence[float], seeds: Sequence[int], tags: Sequence[Any]) -> None:
        """Prefill new rows, sample their first token, and write them into free slots
        (PREFILL_ROWS at a time)."""
        n_rows = audio_features.shape[0]
        if n_rows > PREFILL_ROWS:
            for k in range(0, n_rows, PREFILL_ROWS):
                part = slice(k, k + PREFILL_ROWS)
                self.add(audio_features[part], initial_tokens[part], temperatures[part], seeds[part], tags[part])
            return
        model, rules = self.model, self.rules
        device = audio_features.device
        lengths = [len(t) for t in initial_tokens]
        width = max(lengths)
        # right padding: under the causal mask no real token sees the padding after it
        padded = torch.full((n_rows, width), rules.eot, dtype=torch.long)
        sot_index = torch.zeros(n_rows, dtype=torch.long)
        for r, toks in enumerate(initial_tokens):
            padded[r, : len(toks)] = torch.tensor(toks)
            sot_index[r] = list(toks).index(rules.sot)
        padded, sot_index = padded.to(device), sot_index.to(device)
        positions = torch.arange(width, device=device).expand(n_rows, -1)
        length = torch.tensor(lengths, device=device)

        blocks = model.decoder.blocks
        cross_k = [_heads(b.cross_attn.key(audio_features), b.cross_attn.n_head).contiguous() for b in blocks]
        cross_v = [_heads(b.cross_attn.value(audio_features), b.cross_attn.n_head).contiguous() for b in blocks]
        self_k, self_v = [None] * len(blocks), [None] * len(blocks)

        def store(i, k, v):
            self_k[i], self_v[i] = k, v
            return k, v

        hidden = _decoder_forward(model, padded, positions, store, cross_k, cross_v, mask=None, is_causal=True)
        rows = torch.arange(n_rows, device=device)
        at_sot = _logits(model, hidden[rows, sot_index])
        if rules.no_speech is not None:
            no_speech = at_sot.softmax(dim=-1)[:, rules.no_speech]
        else:
            no_speech = torch.full((n_rows,), float("nan"), device=device)
        logits = _logits(model, hidden[rows, length - 1])

        # whisper stops once the context holds more than n_ctx tokens
        n_steps = [min(self.sample_len, self.n_ctx + 1 - n) for n in lengths]
        new = {
            "next_position": length,
            "key_mask": torch.arange(self.n_ctx, device=device)[None, :] < length[:, None],
            "out_tokens": torch.full((n_rows, self.sample_len), rules.eot, dtype=torch.long, device=device),
            "row_step": torch.zeros(n_rows, dtype=torch.long, device=device),
            "n_steps": torch.tensor(n_steps, device=device),
            "n_sampled": torch.tensor(n_steps, device=device),
            "sum_logprobs": torch.zeros(n_rows, device=device),
            "no_speech": no_speech.float(),
            "done": torch.zeros(n_rows, dtype=torch.bool, device=device),
            "row_temperature": torch.tensor([float(t) for t in temperatures], device=device).clamp(min=GREEDY)[:, None],
            "seed": torch.tensor([int(seed) for seed in seeds], dtype=torch.long, device=device),
            # a prompt that ends in <|notimestamps|> decodes text only (whisper's without_timestamps)
            "timestamps_on": torch.tensor([rules.no_timestamps is None or list(t)[-1] != rules.no_timestamps
                                           for t in initial_tokens], device=device),
            "next_tokens": torch.zeros(n_rows, dtype=torch.long, device=device),
            **{name: torch.full((n_rows,), -1, dtype=torch.long, device=device)
               for name in ("last", "penultimate", "last_ts")},
        }
        self._sample_step(new, logits, 0, self._sampled_rows(temperatures, device))

        # into the lowest free slots, growing the buffers first if they are full
        free = [k for k, row in enumerate(self.slots) if row is None]
        if len(free) < n_rows:
            self._grow(self._bucket(len(self.slots) + n_rows - len(free)), audio_features.dtype)
            free = [k for k, row in enumerate(self.slots) if row is None]
        slots = free[:n_rows]
        index = torch.tensor(slots, device=device)
        for name, value in new.items():
            self.state[name].index_copy_(0, index, value)
        for i, block in enumerate(blocks):
            n_head = block.attn.n_head
            self.self_k[i][:, :, :width].index_copy_(0, index, _heads(self_k[i], n_head))
            self.self_v[i][:, :, :width].index_copy_(0, index, _heads(self_v[i], n_head))
            self.cross_k[i].index_copy_(0, index, cross_k[i])
            self.cross_v[i].index_copy_(0, index, cross_v[i])
        for k, tag, t in zip(slots, tags, temperatures):
            self.slots[k] = _Row(tag, float(t))
        self.bound = max(self.bound, width)
        self.horizon = max(self.horizon, max(n_steps) - 1)

    @staticmethod
    def _sampled_rows(temperatures, device) -> Optional[Tensor]:
        """The rows that sample (an index tensor on `device`), None when none do: made once
        per chunk of tokens, nothing goes from the host per token."""
        rows = [k for k, t in enumerate(temperatures) if t > 0]
        return torch.tensor(rows, device=device) if rows else None

    def _sample_step(self, state: dict, logits: Tensor, step: int, sampled) -> None:
        """Apply the rules, sample one token per row and record it, all in place in `state`."""
        rules = self.rules
        apply_rules(rules, logits, step, state["last"], state["penultimate"], state["last_ts"], state["timestamps_on"])
        tokens = _sample(logits, state, sampled, rules.vocab_keys)
        done = state["done"]
        logprobs = F.log_softmax(logits.float(), dim=-1)  # as whisper, for equal sums
        current = logprobs.gather(1, tokens[:, None])[:, 0]
        state["sum_logprobs"].add_(torch.where(done, torch.zeros_like(current), current))
        tokens = torch.where(done, torch.full_like(tokens, rules.eot), tokens)
        step_index = state["row_step"]
        state["out_tokens"].scatter_(1, step_index.clamp(max=self.sample_len - 1)[:, None], tokens[:, None])
        ended = (tokens == rules.eot) & ~done
        state["n_sampled"].copy_(torch.where(ended, step_index, state["n_sampled"]))
        next_step = step_index + (~done).long()
        done.copy_(done | (tokens == rules.eot) | (next_step >= state["n_steps"]))
        step_index.copy_(next_step)
        state["penultimate"].copy_(state["last"])
        state["last"].copy_(tokens)
        state["last_ts"].copy_(torch.where(tokens >= rules.timestamp_begin, tokens, state["last_ts"]))
        state["next_tokens"].copy_(tokens)

    # ------------------------------------------------------------------ decoding

    def _token_step(self, rows: int, span: int, sampled) -> None:
        """One token for slots [0, rows), attending over columns [0, span): every write is
        in place into the batch's buffers, so the same call can be captured as a graph."""
        state = {name: t[:rows] for name, t in self.state.items()}
        position = state["next_position"]
        state["key_mask"].scatter_(1, position[:, None], True)
        device = position.device
        n_head = self.model.decoder.blocks[0].attn.n_head
        # each row's own column of each head: (rows, heads) index pairs
        at = (torch.arange(rows, device=device)[:, None], torch.arange(n_head, device=device)[None, :],
              position[:, None])

        def store(i, k, v):
            keys, values = self.self_k[i][:rows], self.self_v[i][:rows]
            keys.index_put_(at, k[:, 0].view(rows, n_head, -1))
            values.index_put_(at, v[:, 0].view(rows, n_head, -1))
            return keys[:, :, :span], values[:, :, :span]

        hidden = _decoder_forward(
            self.model, state["next_tokens"][:, None], position[:, None], store,
            [t[:rows] for t in self.cross_k], [t[:rows] for t in self.cross_v],
            mask=state["key_mask"][:, None, None, :span], is_causal=False,
        )
        self._sample_step(state, _logits(self.model, hidden[:, -1]), 1, sampled)
        position.add_((~state["done"]).long())  # a finished row stays where it is: inside the cache

    @torch.no_grad()
    def step(self, max_tokens: int) -> List[Tuple[Any, DecodedWindow]]:
        """Decode up to `max_tokens` tokens for every row (fewer if all rows end first) and
        return the rows that have ended, which leave the batch."""
        if not len(self):
            return []
        tokens = min(max_tokens, self.horizon)
        rows, span = self._rows(), self._span(tokens)
        in_use = self.slots[:rows]
        sampled = self._sampled_rows([row.temperature if row else 0.0 for row in in_use], self.device)
        graph = self.graphs.get((rows, span, sampled is not None)) if self.cuda_graphs else None
        if graph is None and sampled is not None and self.cuda_graphs:
            sampled = ALL_ROWS  # the graphs' own path, eagerly: the same tokens
        for _ in range(tokens):
            if graph is not None:
                graph.replay()
            else:
                self._token_step(rows, span, sampled)
        self.counts["graph_steps" if graph is not None else "eager_steps"] += tokens
        self.horizon -= tokens
        return self._retire(rows)  # which also reads where the rows are: the new bound

    # ------------------------------------------------------------------ CUDA graphs

    def shapes(self, capacity: int) -> List[Tuple[int, int, bool]]:
        """Every (rows, span, sampling) step shape of a batch of `capacity` rows, largest
        first (captured so, the first graph sizes the shared pool for all)."""
        buckets = [b for b in (self.row_buckets or range(1, capacity + 1)) if b <= capacity]
        spans = sorted({min(self.n_ctx, s) for s in range(self.span_step, self.n_ctx + self.span_step,
                                                           self.span_step)}, reverse=True)
        return [(rows, span, sampling) for rows in sorted(buckets, reverse=True) for span in spans
                for sampling in (True, False)]

    @torch.no_grad()
    def capture_graphs(self, capacity: int, dtype: torch.dtype) -> int:
        """At start-up: grow the buffers to the bucket of `capacity` rows and record every
        step shape as a CUDA graph (one eager run of each first: kernels pick their
        algorithms outside the capture). Returns the graphs held; on a failed capture none
        (the batch decodes eagerly from then on, and says so once)."""
        if not self.cuda_graphs:
            return 0
        if len(self) == 0 and len(self.slots) < self._bucket(capacity):
            self._grow(self._bucket(capacity), dtype)
        api = self._graph_api or CudaGraphs(self.device)
        self._graph_api = api
        for rows, span, sampling in self.shapes(len(self.slots)):
            sampled = ALL_ROWS if sampling else None
            self._token_step(rows, span, sampled)  # idle rows: every slot is free
            graph = api.graph()
            try:
                with api.stream_context():  # the thread's stream is restored whatever capture_end does
                    with api.capture(graph, self._pool):
                        self._token_step(rows, span, sampled)
            except Exception:
                api.abandon(graph)
                self.counts["capture_failures"] += 1
                logger.error("capturing the decode step (%d rows, %d columns%s) as a CUDA graph failed: the "
                             "decode batch runs eagerly from now on (set cuda_graphs: false to skip capturing)",
                             rows, span, ", sampling" if sampling else "", exc_info=True)
                self.graphs.clear()
                self._pool = None
                self.cuda_graphs = False
                return 0
            self._pool = self._pool or graph.pool()
            self.graphs[(rows, span, sampling)] = graph
        logger.info("decode step captured as %d CUDA graphs (up to %d rows)", len(self.graphs), len(self.slots))
        return len(self.graphs)

    def clear(self) -> List[Any]:
        """Drop every row (after a failure), keeping the buffers and graphs; returns their tags."""
        tags = self.tags
        self.slots = [None] * len(self.slots)
        if self.state:
            self.state["done"].fill_(True)
        self.bound = self.horizon = 0
        return tags

    def _retire(self, rows: int) -> List[Tuple[Any, DecodedWindow]]:
        state = self.state
        # the one host sync per chunk: which rows ended, and where the others are
        done, position = torch.stack([state["done"][:rows].long(), state["next_position"][:rows]]).tolist()
        ended = [k for k in range(rows) if self.slots[k] is not None and done[k]]
        finished = []
        if ended:
            index = torch.tensor(ended, device=self.device)
            # two copies to the host for all ended rows: their tokens with counts, their scores
            tokens_and_counts = torch.cat([state["out_tokens"].index_select(0, index),
                                           state["n_sampled"].index_select(0, index)[:, None]], dim=1).tolist()
            sums, no_speech = torch.stack([state["sum_logprobs"].index_select(0, index),
                                           state["no_speech"].index_select(0, index)]).tolist()
            for j, k in enumerate(ended):
                row = self.slots[k]
                tokens = tokens_and_counts[j][: tokens_and_counts[j][-1]]
                text = self.tokenizer.decode(tokens).strip()
                finished.append((row.tag, DecodedWindow(
                    tokens=tokens, text=text, sum_logprob=sums[j], avg_logprob=sums[j] / (len(tokens) + 1),
                    no_speech_prob=no_speech[j], temperature=row.temperature,
                    compression_ratio=compression_ratio(text),
                )))
                self.slots[k] = None
        live = [k for k, row in enumerate(self.slots) if row is not None]
        self.bound = max((position[k] for k in live), default=0)
        if not live:
            self.horizon = 0
        self._compact(live)
        return finished

    def _compact(self, live: List[int]) -> None:
        """Move the rows in slots past the smallest bucket that holds them all into free
        slots below it (a step runs over a bucket of slots; free ones below run idle)."""
        target = self._bucket(len(live))
        movers = [k for k in live if k >= target]
        if not movers:
            return
        holes = [k for k in range(target) if self.slots[k] is None][: len(movers)]
        src = torch.tensor(movers, device=self.device)
        dst = torch.tensor(holes, device=self.device)
        for t in self._buffers():
            t.index_copy_(0, dst, t.index_select(0, src))
        self.state["done"].index_fill_(0, src, True)  # the old slots become idle rows
        for a, b in zip(movers, holes):
            self.slots[b], self.slots[a] = self.slots[a], None
