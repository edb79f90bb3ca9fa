"""The sampler: batch invariance, agreement with transformers' generate, stopping,
padding safety, reproducible sampling and a bounded number of compilations."""

import collections
import contextlib
import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_models import IdTokenizer, make_tiny_hf_model
from jax import monitoring

from gsm8k_jax.models.gemma3.config import gemma3_tiny
from gsm8k_jax.models.gemma3.model import Gemma3
from gsm8k_jax.models.gemma3.params import load_hf_model
from gsm8k_jax.models.gemma3.sharding import make_mesh
from gsm8k_jax.sampling import requests
from gsm8k_jax.sampling.batching import SlotScheduler, num_chunks
from gsm8k_jax.sampling.decode import DecodeState, prefill
from gsm8k_jax.sampling.sampler import Sampler, SamplingParams

EOS = 1
# Prompt + generation (up to 45 + 24) is far longer than the window of 8.
GREEDY = SamplingParams(max_generation_steps=24, eos_ids=(EOS,))
SAMPLED = dataclasses.replace(GREEDY, temperature=0.8, top_p=0.9, top_k=50, seed=7)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_mqa")
    make_tiny_hf_model(path, "mqa")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path):
    ref = transformers.Gemma3ForCausalLM.from_pretrained(tiny_path).float().eval()
    return ref, load_hf_model(tiny_path, dtype=jnp.float32)


@pytest.fixture(scope="module")
def sampler(tiny):
    # Tiles of 4 slots: batch sizes 1 to 32 run 1 to 8 tiles per step.
    return Sampler(tiny[1], IdTokenizer(), row_tile=4)


@pytest.fixture(scope="module")
def bf16_sampler(tiny_path):
    return Sampler(
        load_hf_model(tiny_path, dtype=jnp.bfloat16), IdTokenizer(), row_tile=4
    )


def make_prompts(count, seed=0):
    rng = np.random.RandomState(seed)
    # Lengths 3..45 take one or two prefill chunks of 32 on CPU: rows get
    # different amounts of left padding and of prefill calls.
    return [
        [2, *rng.randint(3, 512, size=n).tolist()]
        for n in rng.randint(2, 45, size=count)
    ]


PROMPTS = make_prompts(32)


def generate_in_batches(sampler, prompts, ids, batch, params):
    out = []
    for start in range(0, len(prompts), batch):
        out += sampler.generate(
            prompts[start : start + batch],
            params,
            example_ids=ids[start : start + batch],
            batch_size=batch * params.num_samples,
        )
    return {(c.example_id, c.sample_index): c for c in out}


def as_bits(results):
    """Tokens and the exact summed log-probability of every row."""
    return {key: (c.tokens, c.logprob) for key, c in results.items()}


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("which", ["sampler", "bf16_sampler"], ids=["f32", "bf16"])
def test_results_identical_at_any_batch_size_and_order(request, which, params):
    sampler = request.getfixturevalue(which)
    ids = list(range(len(PROMPTS)))
    baseline = as_bits(generate_in_batches(sampler, PROMPTS, ids, 1, params))
    for batch in (2, 7, 32):
        assert (
            as_bits(generate_in_batches(sampler, PROMPTS, ids, batch, params))
            == baseline
        )
    order = ids[:]
    random.Random(0).shuffle(order)
    # At a batch size already compiled: other neighbours, the same programs.
    shuffled = generate_in_batches(
        sampler, [PROMPTS[i] for i in order], order, 7, params
    )
    assert as_bits(shuffled) == baseline


@pytest.mark.parametrize("which", ["sampler", "bf16_sampler"], ids=["f32", "bf16"])
def test_results_do_not_depend_on_the_cache_length(request, which):
    """A long prompt elsewhere in the call (a 4x longer KV cache), or room
    reserved for one, changes no bit of a short prompt's completion."""
    sampler = request.getfixturevalue(which)
    short = PROMPTS[:4]
    alone = as_bits(generate_in_batches(sampler, short, [0, 1, 2, 3], 4, GREEDY))
    long_prompt = [2, *range(3, 300)]
    mixed = sampler.generate([*short, long_prompt], GREEDY, batch_size=4)
    assert as_bits({(c.example_id, 0): c for c in mixed[:4]}) == alone
    roomy = sampler.generate(short, GREEDY, max_prompt_len=1000)
    assert as_bits({(c.example_id, 0): c for c in roomy}) == alone


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_results_do_not_depend_on_whether_the_cache_outgrows_the_window(dtype):
    """With a 128-token window, a prompt's cache is shorter than the window
    alone, and longer with room reserved for longer prompts: the same bits
    (the sliding layers keep a whole ring either way)."""
    config = dataclasses.replace(gemma3_tiny(), sliding_window=128)
    model = Gemma3(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    sampler = Sampler(model, IdTokenizer(), row_tile=4)
    prompts = [[2, *range(3, 63)], [2, *range(100, 110)]]  # 61 and 11 tokens
    params = SamplingParams(max_generation_steps=40, eos_ids=(EOS,))
    alone = sampler.generate(prompts, params)
    roomy = sampler.generate(prompts, params, max_prompt_len=200)
    assert [(c.tokens, c.logprob) for c in roomy] == [
        (c.tokens, c.logprob) for c in alone
    ]


def test_greedy_equals_transformers_generate(tiny, sampler):
    ref, _ = tiny
    prompts = PROMPTS[:8]
    width = max(map(len, prompts))
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    with torch.no_grad():
        expected = ref.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=GREEDY.max_generation_steps,
            do_sample=False,
            eos_token_id=EOS,
            pad_token_id=0,
        )[:, width:].numpy()
    for row, completion in enumerate(sampler.generate(prompts, GREEDY)):
        assert completion.tokens == expected[row, : completion.num_tokens].tolist()


def test_stops_at_any_eos_and_settings_are_not_stale(sampler):
    prompt = PROMPTS[0]
    (free,) = sampler.generate([prompt], GREEDY)
    assert (
        free.finish_reason == "length"
        and free.num_tokens == GREEDY.max_generation_steps
    )
    # Make a later generated token an eos id: generation must stop there.
    cut = next(t for t in range(3, 20) if free.tokens[t] not in free.tokens[:t])
    stopping = dataclasses.replace(GREEDY, eos_ids=(EOS, free.tokens[cut]))
    (stopped,) = sampler.generate([prompt], stopping)
    assert stopped.finish_reason == "eos"
    assert stopped.tokens == free.tokens[: cut + 1] and stopped.num_tokens == cut + 1
    # Back to the first eos ids in the same process: no stale constant.
    (again,) = sampler.generate([prompt], GREEDY)
    assert again.tokens == free.tokens


def test_rows_finish_independently(sampler):
    free = sampler.generate(PROMPTS[:4], GREEDY)
    stop_token = free[1].tokens[2]
    stopping = dataclasses.replace(GREEDY, eos_ids=(stop_token,))
    for before, after in zip(free, sampler.generate(PROMPTS[:4], stopping)):
        if stop_token in before.tokens:
            cut = before.tokens.index(stop_token) + 1
            assert (after.tokens, after.finish_reason) == (before.tokens[:cut], "eos")
        else:
            assert (after.tokens, after.finish_reason) == (before.tokens, "length")


def test_pad_id_that_the_model_emits_changes_nothing(tiny, sampler):
    """Validity is explicit: a pad id equal to a generated token (or to eos)
    must not alter masking."""
    baseline = sampler.generate(PROMPTS[:8], GREEDY)
    emitted = baseline[0].tokens[0]
    for pad in (emitted, EOS):
        other = Sampler(tiny[1], IdTokenizer(pad_token_id=pad))
        assert [c.tokens for c in other.generate(PROMPTS[:8], GREEDY)] == [
            c.tokens for c in baseline
        ]


def test_padding_rows_and_fully_masked_queries_are_finite(tiny, sampler):
    model = tiny[1]
    valid = jnp.zeros((2, 16), bool).at[1, 10:].set(True)
    hidden, _ = model(
        jnp.zeros((2, 16), jnp.int32), jnp.zeros((2, 16), jnp.int32), valid
    )
    assert np.isfinite(np.asarray(model.logits(hidden))).all()
    padded = sampler.generate(PROMPTS[:3], GREEDY, batch_size=8)
    assert all(np.isfinite(c.logprob) for c in padded)
    assert [c.tokens for c in padded] == [
        c.tokens for c in sampler.generate(PROMPTS[:3], GREEDY)
    ]


def test_sampling_is_reproducible_and_seeded(sampler):
    first = sampler.generate(PROMPTS[:8], SAMPLED)
    assert [c.tokens for c in sampler.generate(PROMPTS[:8], SAMPLED)] == [
        c.tokens for c in first
    ]
    reseeded = sampler.generate(PROMPTS[:8], dataclasses.replace(SAMPLED, seed=8))
    assert [c.tokens for c in reseeded] != [c.tokens for c in first]
    greedy = sampler.generate(PROMPTS[:8], GREEDY)
    assert [c.tokens for c in first] != [c.tokens for c in greedy]


def test_num_samples_draws_distinct_samples_per_prompt(sampler):
    params = dataclasses.replace(
        SAMPLED, num_samples=3, temperature=1.5, top_p=1.0, top_k=0
    )
    out = sampler.generate(PROMPTS[:2], params, example_ids=[10, 11])
    assert [(c.example_id, c.sample_index) for c in out] == [
        (i, j) for i in (10, 11) for j in range(3)
    ]
    assert len({tuple(c.tokens) for c in out[:3]}) == 3


def test_top_k_one_and_tiny_top_p_are_greedy(sampler):
    greedy = [c.tokens for c in sampler.generate(PROMPTS[:4], GREEDY)]
    for restricted in (
        dataclasses.replace(SAMPLED, top_k=1, top_p=1.0),
        dataclasses.replace(SAMPLED, top_k=0, top_p=1e-6),
    ):
        assert [c.tokens for c in sampler.generate(PROMPTS[:4], restricted)] == greedy


def test_logprob_is_sum_of_chosen_token_log_probs(tiny, sampler):
    model = tiny[1]
    (c,) = sampler.generate([PROMPTS[0]], GREEDY)
    ids = jnp.asarray([PROMPTS[0] + c.tokens])
    n = ids.shape[1]
    hidden, _ = model(ids, jnp.arange(n)[None], jnp.ones((1, n), bool))
    logp = jax.nn.log_softmax(model.logits(hidden)[0], axis=-1)
    start = len(PROMPTS[0]) - 1
    expected = sum(float(logp[start + t, tok]) for t, tok in enumerate(c.tokens))
    assert c.logprob == pytest.approx(expected, abs=1e-3)


@contextlib.contextmanager
def count_compile_events():
    """Counts JAX's tracing, lowering and backend-compile events in the block
    (by the event's last word: "jaxpr_trace", "backend_compile", ...)."""
    counts = collections.Counter()

    def listen(event, duration, **kwargs):
        if event.startswith("/jax/core/compile/"):
            counts[event.rsplit("/", 1)[1].removesuffix("_duration")] += 1

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        monitoring.unregister_event_duration_listener(listen)


def test_compiles_once_per_shape(tiny):
    """One decode program and one prefill program per (slots, cache length),
    whatever the prompts' lengths, also when continuous batching refills
    slots."""
    sampler = Sampler(tiny[1], IdTokenizer(), row_tile=4)
    lengths = [3, 9, 20, 31, 32, 60]  # one or two chunks, one cache length
    for n in lengths:
        sampler.generate([[2] * n] * 3, GREEDY, batch_size=4)
    assert sampler.num_compilations == 2
    sampler.generate(
        [[2] * 50], dataclasses.replace(GREEDY, temperature=1.0, seed=3), batch_size=4
    )
    sampler.generate([[2] * 50] * 9, GREEDY, batch_size=4)  # refills slots
    assert sampler.num_compilations == 2
    sampler.generate([[2] * 50] * 9, GREEDY, batch_size=8)  # two tiles of slots
    assert sampler.num_compilations == 4
    sampler.generate([[2] * 120], GREEDY, batch_size=4)  # a longer cache
    assert sampler.num_compilations == 6
    steps_before_compile = sampler.decode_steps
    # `compile` builds exactly the programs the same call runs, ahead of it
    # and without running them: the call then traces and compiles nothing.
    mixed = [[2] * 5, [2] * 70, [2] * 300]  # 1, 3 and 10 chunks; a longer cache
    with count_compile_events() as during_compile:
        sampler.compile(mixed, GREEDY, batch_size=4)
    assert during_compile["backend_compile"] >= 2  # the prefill and the decode
    assert sampler.decode_steps == steps_before_compile
    with count_compile_events() as during_call:
        sampler.generate(mixed, GREEDY, batch_size=4)
    assert during_call == {}
    assert sampler.num_compilations == 8


def test_compiles_ahead_on_a_mesh(tiny_path):
    """On a mesh (the eval script's with more than one device), the call
    after `compile` also traces and compiles nothing: the state it decodes
    after a prefill is placed as the one `compile` lowered with."""
    mesh = make_mesh(1, 1)
    model = load_hf_model(tiny_path, dtype=jnp.float32, mesh=mesh)
    sampler = Sampler(model, IdTokenizer(), row_tile=4, mesh=mesh)
    prompts = [[2] * 5, [2] * 40]
    sampler.compile(prompts, GREEDY, batch_size=4)
    with count_compile_events() as during_call:
        sampler.generate(prompts, GREEDY, batch_size=4)
    assert during_call == {}


def test_compiles_ahead_for_weights_committed_to_their_device(tiny_path):
    """Weights committed to their device (`jax.device_put`, as a LoRA's
    factors are) commit every program output: the call after `compile`
    compiled both programs again until the empty decode state was committed
    to the weights' device too. In the default dtype."""
    model = load_hf_model(tiny_path)
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    assert model.layers[0].mlp.down_proj.kernel[...].committed
    sampler = Sampler(model, IdTokenizer(), row_tile=4)
    prompts = [[2] * 5, [2] * 40]
    sampler.compile(prompts, GREEDY, batch_size=4)
    with count_compile_events() as during_call:
        sampler.generate(prompts, GREEDY, batch_size=4)
    assert during_call == {}


@pytest.mark.parametrize("which", ["sampler", "bf16_sampler"], ids=["f32", "bf16"])
def test_continuous_batching_equals_batch_size_one(request, which):
    """32 sequences through 4 slots, finishing at different times (a token
    they generate made an eos id), give the batch-size-1 results to the bit."""
    sampler = request.getfixturevalue(which)
    ids = list(range(len(PROMPTS)))
    for free_params in (GREEDY, dataclasses.replace(GREEDY, temperature=0.9, seed=3)):
        free = sampler.generate(PROMPTS, free_params, example_ids=ids)

        def finishing_steps(token, free=free):
            return {c.tokens.index(token) if token in c.tokens else -1 for c in free}

        candidates = sorted({t for c in free for t in c.tokens})
        stop = max(candidates, key=lambda t: len(finishing_steps(t)))
        params = dataclasses.replace(free_params, eos_ids=(EOS, stop))
        alone = generate_in_batches(sampler, PROMPTS, ids, 1, params)
        lengths = {c.num_tokens for c in alone.values()}
        assert len(lengths) > 3, "sequences must finish at different steps"
        slotted = sampler.generate(PROMPTS, params, example_ids=ids, batch_size=4)
        assert len(slotted) == len(alone)
        assert as_bits({(c.example_id, c.sample_index): c for c in slotted}) == (
            as_bits(alone)
        )


def test_per_prompt_token_limits(sampler):
    """max_tokens stops each prompt at its own limit, with the tokens it would
    have produced anyway; one slot runs one decode step per token."""
    prompts = PROMPTS[:6]
    limits = [1, 5, 24, 2, 13, 7]
    one_slot = Sampler(sampler.model, sampler.tokenizer, row_tile=1)
    free = one_slot.generate(prompts, GREEDY)
    steps_before = one_slot.decode_steps
    capped = one_slot.generate(prompts, GREEDY, max_tokens=limits, batch_size=1)
    for full, short, limit in zip(free, capped, limits):
        assert short.num_tokens == min(limit, full.num_tokens)
        assert short.tokens == full.tokens[:limit]
        if full.num_tokens > limit:
            assert short.finish_reason == "length"
    assert one_slot.decode_steps - steps_before == sum(c.num_tokens for c in capped)
    with pytest.raises(ValueError, match="max_tokens"):
        sampler.generate(prompts, GREEDY, max_tokens=[25] * 6)
    with pytest.raises(ValueError, match="max_tokens"):
        sampler.generate(prompts, GREEDY, max_tokens=[3])


def first_stop_end(tokens, stops):
    """How many of `tokens` there are up to the end of the first stop
    sequence in them, or None."""
    for end in range(1, len(tokens) + 1):
        if any(tuple(tokens[max(end - len(s), 0) : end]) == s for s in stops):
            return end
    return None


@pytest.mark.parametrize("which", ["sampler", "bf16_sampler"], ids=["f32", "bf16"])
def test_stop_sequences_end_rows_where_they_are_generated(request, which):
    """A row ends with the first stop sequence it generates: the tokens and
    log-probability of the same row stopped there by a length limit, and
    the same bits alone, in batches and through continuous batching."""
    sampler = request.getfixturevalue(which)
    ids = list(range(len(PROMPTS)))
    free = sampler.generate(PROMPTS, GREEDY, example_ids=ids)
    # Stops of one to three tokens taken from what the rows generate.
    ngrams = collections.Counter(
        tuple(c.tokens[i : i + n])
        for c in free
        for n in (1, 2, 3)
        for i in range(len(c.tokens) - n + 1)
        if EOS not in c.tokens[i : i + n]
    )
    stops = [max((g for g in ngrams if len(g) == n), key=ngrams.get) for n in (1, 2, 3)]
    ends = [first_stop_end(c.tokens, stops) for c in free]
    assert len({e for e in ends if e is not None}) > 3, "rows must stop apart"
    limited = sampler.generate(
        PROMPTS,
        GREEDY,
        example_ids=ids,
        max_tokens=[e or GREEDY.max_generation_steps for e in ends],
    )
    stopped = collections.defaultdict(list)
    for start in range(0, len(PROMPTS), 4):  # alone (every fourth row)
        (c,) = sampler.generate(
            [PROMPTS[start]], GREEDY, example_ids=[start], stop_sequences=stops
        )
        stopped[start].append(c)
    for batch in (4, 32):  # 32 rows through 4 slots, then at once
        for c in sampler.generate(
            PROMPTS, GREEDY, example_ids=ids, batch_size=batch, stop_sequences=stops
        ):
            stopped[c.example_id].append(c)
    for i, end in enumerate(ends):
        reference = limited[i] if end is not None else free[i]
        for c in stopped[i]:
            assert (c.tokens, c.logprob) == (reference.tokens, reference.logprob)
            assert c.finish_reason == ("stop" if end else free[i].finish_reason)
    with pytest.raises(ValueError, match="one or more token ids"):
        sampler.generate(PROMPTS[:1], GREEDY, stop_sequences=[()])


def test_tiles_run_only_while_one_of_their_slots_is_live(sampler):
    """A tile whose slots are all done is not run: 8 slots in tiles of 4, the
    first tile's sequences stop after 3 tokens and the second's after 10, so
    10 decode steps run 3 + 10 tiles."""
    never = SamplingParams(max_generation_steps=10, eos_ids=(10**6,))
    prompts = [PROMPTS[0]] * 8  # two prefill groups of 4 slots
    before = sampler.decode_steps, sampler.tile_steps
    out = sampler.generate(prompts, never, batch_size=8, max_tokens=[3] * 4 + [10] * 4)
    assert [c.num_tokens for c in out] == [3] * 4 + [10] * 4
    assert sampler.decode_steps - before[0] == 10
    assert sampler.tile_steps - before[1] == 3 + 10


def test_prompts_are_prefilled_in_whole_chunks(sampler):
    """A prompt takes as many prefill calls as it has chunks, each call one
    fixed-shape program of G rows, and a burst takes as few calls as its
    chunks allow: G + 1 two-chunk prompts take 3 calls, where running each
    row's chunks in successive calls takes 4 (G rows, then the last one)."""
    chunk, group = sampler.prefill_chunk, sampler.prefill_group
    assert [num_chunks(n, chunk) for n in (1, chunk, chunk + 1)] == [1, 1, 2]
    before = sampler.prefilled_tokens
    # Varied tokens: a chunk run against the wrong cache changes the answer.
    prompts = [
        [3 + (i + j) % 7 for j in range(chunk + 1 + i)] for i in range(group + 1)
    ]
    assert {num_chunks(len(p), chunk) for p in prompts} == {2}
    out = sampler.generate(prompts, GREEDY, batch_size=group + 1)
    assert sampler.prefilled_tokens - before == 3 * group * chunk
    # The same greedy tokens as each prompt alone.
    for prompt, completion in zip(prompts, out):
        assert completion.tokens == sampler.generate([prompt], GREEDY)[0].tokens


def test_a_burst_runs_the_rows_with_most_chunks_left():
    """Each call of a burst runs the rows with the most chunks left, so three
    two-chunk rows share calls of two: 3 calls, not 4."""
    schedule = SlotScheduler([2, 2, 2], num_slots=3, group_size=2)
    assert schedule.next_call() == [(0, 0, 0), (1, 1, 0)]
    assert schedule.next_call() == [(2, 2, 0), (0, 0, 1)]  # 2 has most left
    assert schedule.next_call() == [(1, 1, 1), (2, 2, 1)]
    assert schedule.next_call() is None


def test_the_scheduler_keeps_prefill_calls_full():
    """Rows wait longest first; a burst gives every free slot a row and runs
    the rows with the most chunks left; decode returns for a whole group."""
    schedule = SlotScheduler([1, 3, 1, 1, 2, 1], num_slots=4, group_size=2)
    assert schedule.next_call() == [(1, 0, 0), (4, 1, 0)]  # the most chunks first
    assert schedule.next_call() == [(1, 0, 1), (4, 1, 1)]
    assert schedule.next_call() == [(1, 0, 2), (0, 2, 0)]
    assert schedule.next_call() == [(2, 3, 0)]  # a burst fills every free slot
    assert schedule.next_call() is None  # no slot free
    assert schedule.min_free() == 2  # two rows wait
    schedule.release(2)
    assert schedule.next_call() is None  # others decode: wait for the group
    schedule.release(0)
    assert schedule.next_call() == [(3, 0, 0), (5, 2, 0)]
    assert schedule.min_free() == len(schedule.owner) + 1  # none waits
    assert schedule.next_call() is None


@pytest.mark.parametrize("seed", range(20))
def test_the_scheduler_prefills_every_row_whole_before_decode(seed):
    """Under random prompts, groups, slots and finishing orders: a call
    holds each slot once and at most a group; a row's chunks run 0, 1, ...
    in calls of one burst into the slot it was given; a burst takes the
    fewest calls its chunks allow (its chunks over the group, or its longest
    prompt); decode never runs while a row is mid-prompt; every row is
    prefilled once and the schedule ends."""
    rng = np.random.default_rng(seed)
    chunks = rng.integers(1, 7, size=int(rng.integers(1, 41))).tolist()
    group = int(rng.integers(1, 9))
    num_slots = group * int(rng.integers(1, 5))
    schedule = SlotScheduler(chunks, num_slots=num_slots, group_size=group)
    progress, done_rows = {}, []  # row -> (slot, chunks run)
    for _ in range(10_000):
        if schedule.idle:
            break
        burst = collections.Counter()  # row -> its chunks run in this burst
        calls = 0
        while (call := schedule.next_call()) is not None:
            calls += 1
            burst.update(row for row, _, _ in call)
            assert 0 < len(call) <= group
            assert len({slot for _, slot, _ in call}) == len(call)
            for row, slot, k in call:
                assert schedule.owner[slot] == row
                assert progress.get(row, (slot, 0)) == (slot, k)
                progress[row] = (slot, k + 1)
        if calls:
            assert calls == max(-(-sum(burst.values()) // group), max(burst.values()))
        mid_prompt = [r for r, (_, n) in progress.items() if n < chunks[r]]
        assert not mid_prompt and not schedule.next_chunk
        decoding = [s for s, r in enumerate(schedule.owner) if r is not None]
        assert decoding  # decode has work
        # Decode returns once min_free slots are free (or all are done).
        need = min(schedule.min_free(), num_slots) - len(schedule.free_slots)
        for slot in rng.permutation(decoding)[: max(need, 1)]:
            done_rows.append(schedule.release(int(slot)))
    assert schedule.idle
    assert sorted(done_rows) == list(range(len(chunks)))
    assert all(progress[r][1] == chunks[r] for r in range(len(chunks)))


def test_bad_settings_are_rejected(sampler):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sampler.generate(PROMPTS[:3], GREEDY, batch_size=0)
    with pytest.raises(ValueError, match="Empty prompt"):
        sampler.generate([[]], GREEDY)
    # Shared ids would share random keys, and the results' order would
    # depend on which prompt finished first.
    with pytest.raises(ValueError, match=r"example_ids \[7\] repeat"):
        sampler.generate(PROMPTS[:3], GREEDY, example_ids=[7, 7, 8])
    # The embedding lookup would clamp them to its last row, silently.
    vocab = sampler.model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"Prompt 1 holds token ids \[{bad}\]"):
            sampler.generate([[2, 5], [2, bad, 7]], GREEDY)
    with pytest.raises(TypeError, match="a single string: pass a list"):
        sampler.generate("What is 2 + 3?", GREEDY)
    # Past the trained positions it would generate noise, into a cache
    # sized by the limit.
    context = sampler.model.config.max_position_embeddings
    too_long = dataclasses.replace(GREEDY, max_generation_steps=context - 9)
    with pytest.raises(ValueError, match=f"A 10-token prompt plus up to {context - 9}"):
        sampler.generate([[2, 5], [2] * 10], too_long)
    requests.check_context([2, 10], context - 10, context)  # Fits exactly.


def test_prefill_and_decode_carry_no_vocabulary_sized_array(tiny):
    """Prefill projects nothing onto the vocabulary, and the decode state
    carries each slot's hidden state, not its [V] logits: the decode step
    computes them for the tile it runs."""
    model = tiny[1]
    graphdef, params = nnx.split(model)
    state = DecodeState.empty(model, 4, 32, 8, pad_id=0, chunk=32)
    tokens, pads = jnp.zeros((4, 32), jnp.int32), jnp.zeros((4,), jnp.int32)
    slots, ids = jnp.arange(4), jnp.arange(4)
    limits = jnp.full((4,), 8)
    jaxpr = jax.make_jaxpr(
        lambda p, s: prefill(
            graphdef,
            p,
            s,
            tokens,
            pads,
            ids * 0,
            ids >= 0,
            slots,
            0,
            ids,
            ids,
            limits,
            pad_id=0,
        )
    )(params, state)

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape"))
            for param in eqn.params.values():  # Nested jaxprs (jit, custom_jvp...).
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    yield from shapes(inner)

    vocab = model.config.vocab_size
    assert not [s for s in shapes(jaxpr.jaxpr) if s and s[-1] == vocab]
    assert not [x.shape for x in jax.tree.leaves(state) if vocab in x.shape]
