"""
The inference engine against the naive reference (GPT.generate / full recompute): KV cache,
multi-sample and multi-prompt (ragged) batches, continuous batching, sampling, stop strings,
UTF-8-safe text streaming, and the calculator tool driven by a model trained to call it.
"""
import time

import pytest
import torch

from nanochat.engine import Engine, RaggedKVCache, TextStream, SamplingParams, use_calculator
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Once upon a time there was a little model that wanted to talk. It said hello to everyone.",
    "What is two plus two? Two plus two is four. What is six times seven? It is forty two.",
    "Numbers: 12 + 30 = 42, 100 / 4 = 25, 7 * 8 = 56. The answer is in the details.",
] * 20

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter(CORPUS), vocab_size=512)

def tiny_model(tok, seed=0, std=None):
    """A random 2-layer model. std: re-draw every weight ~N(0, std) so the blocks are not the
    identity (c_proj starts at zero) and greedy decoding depends on the whole context."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    if std is not None:
        for p in model.parameters():
            torch.nn.init.normal_(p, std=std)
    return model.eval()

@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, std=0.3)

def naive_greedy(model, prompt, max_tokens, end_tokens):
    """Full recompute every step (no cache), stopping after an end token like the engine."""
    out = []
    for token in model.generate(prompt, max_tokens=max_tokens, temperature=0.0):
        out.append(token)
        if token in end_tokens:
            break
    return out

def generate_columns(engine, tokens, num_samples=1, **sampling):
    """Per decode step, one id per sample and its mask (1 sampled, 0 forced); a finished sample gives None, 0."""
    decoder = engine.decoder()
    decoder.add(tokens, SamplingParams(**sampling), num_samples)
    columns = []
    while decoder.num_rows:
        column, masks = [None] * num_samples, [0] * num_samples
        for row, _ in decoder.step():
            column[row.index], masks[row.index] = row.tokens[-1], row.masks[-1]
        columns.append((column, masks))
    return columns

def generate_text(engine, tokens, **sampling):
    """One continuation as the text chunks a client is streamed (tool calls as <<expr=result>>)."""
    decoder = engine.decoder()
    decoder.add(tokens, SamplingParams(**sampling))
    chunks = []
    while decoder.num_rows:
        chunks += [text for _, text in decoder.step() if text]
    return chunks

def prompts_of(tok, texts):
    return [tok.encode(t, prepend="<|bos|>") for t in texts]

# -----------------------------------------------------------------------------
# KV cache == full recompute

def test_greedy_matches_naive_batch_one_and_many_samples(tok, model):
    engine = Engine(model, tok)
    for prompt in prompts_of(tok, ["The quick brown", "What is six times seven? It is", "x"]):
        expected = naive_greedy(model, prompt, 40, engine.end_tokens)
        columns = generate_columns(engine, prompt, num_samples=3, max_tokens=40, temperature=0.0)
        for i in range(3):
            got = [col[i] for col, _ in columns if col[i] is not None]
            assert got == expected
        assert all(mask == [1, 1, 1] for _, mask in columns[:len(expected)])

def test_cache_grows_past_its_first_size(tok, model, monkeypatch):
    monkeypatch.setattr(RaggedKVCache, "TIME_CHUNK", 8)  # grow every 8 positions
    engine = Engine(model, tok)
    prompt = prompts_of(tok, ["Once upon a time there was"])[0]
    expected = naive_greedy(model, prompt, 100, engine.end_tokens)
    results, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=100, temperature=0.0)
    assert len(expected) > 16, "the run must outgrow the cache several times"
    for row in results:
        assert row[len(prompt):] == [t for t in expected if t not in engine.end_tokens]

def test_cache_grows_past_the_default_chunk_and_sequence_len(tok, model):
    engine = Engine(model, tok)
    prompt = prompts_of(tok, ["Numbers: 12 + 30 ="])[0]
    n = RaggedKVCache.TIME_CHUNK + 20  # past the first allocation and 4x the model's sequence_len
    results, _ = engine.generate_batch(prompt, max_tokens=n, temperature=0.0)
    expected = naive_greedy(model, prompt, n, engine.end_tokens)
    assert results[0][len(prompt):] == [t for t in expected if t not in engine.end_tokens]

def test_ragged_multi_prompt_batch_matches_each_prompt_alone(tok, model):
    engine = Engine(model, tok)
    texts = ["x", "The quick brown fox jumps over the", "What is", "Once upon a time there was a little model that"]
    prompts = prompts_of(tok, texts)
    assert len({len(p) for p in prompts}) == len(prompts), "prompts of different lengths"
    outputs = engine.generate_multi(prompts, max_tokens=30, temperature=0.0)
    for prompt, (results, masks) in zip(prompts, outputs):
        expected = naive_greedy(model, prompt, 30, engine.end_tokens)
        assert results[0][:len(prompt)] == prompt and masks[0][:len(prompt)] == [0] * len(prompt)
        assert results[0][len(prompt):] == [t for t in expected if t not in engine.end_tokens]

def test_continuous_batching_rows_join_and_leave(tok, model):
    """Requests join a running batch at different steps, leave at different lengths (the last
    row moves into the freed slot), and each still decodes exactly as it would alone."""
    engine = Engine(model, tok)
    decoder = engine.decoder(max_batch_size=4)
    plan = {0: ("The quick", 12), 0.5: ("x", 30), 3: ("What is six times", 5), 7: ("Once upon a time", 20),
            9: ("It said hello to", 25), 20: ("Numbers:", 8)}
    rows, step = {}, 0
    pending = sorted(plan.items())
    while pending or decoder.num_rows:
        while pending and pending[0][0] <= step and decoder.has_room():
            _, (text, max_tokens) = pending.pop(0)
            prompt = prompts_of(tok, [text])[0]
            rows[text] = (prompt, decoder.add(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))[0])
        assert decoder.num_rows <= 4
        decoder.step()
        step += 1
    assert len(rows) == len(plan)
    for text, (prompt, row) in rows.items():
        max_tokens = dict(plan.values())[text]
        assert row.tokens == naive_greedy(model, prompt, max_tokens, engine.end_tokens), text
        assert row.finish_reason in ("stop", "length")

def test_cancel_removes_a_row_without_disturbing_the_others(tok, model):
    engine = Engine(model, tok)
    decoder = engine.decoder()
    prompts = prompts_of(tok, ["The quick brown", "What is six", "Once upon"])
    rows = [decoder.add(p, SamplingParams(temperature=0.0, max_tokens=15))[0] for p in prompts]
    for _ in range(4):
        decoder.step()
    decoder.cancel(rows[0])
    assert rows[0].finish_reason == "cancelled" and decoder.num_rows == 2
    while decoder.num_rows:
        decoder.step()
    assert len(rows[0].tokens) == 4
    for prompt, row in zip(prompts[1:], rows[1:]):
        assert row.tokens == naive_greedy(model, prompt, 15, engine.end_tokens)

# -----------------------------------------------------------------------------
# Sampling

def test_seeded_sampling_is_reproducible_and_matches_the_reference(tok, model):
    engine = Engine(model, tok)
    prompt = prompts_of(tok, ["The quick brown"])[0]
    kwargs = dict(max_tokens=25, temperature=1.0, top_k=50)
    a, _ = engine.generate_batch(prompt, num_samples=2, seed=7, **kwargs)
    b, _ = engine.generate_batch(prompt, num_samples=2, seed=7, **kwargs)
    c, _ = engine.generate_batch(prompt, num_samples=2, seed=8, **kwargs)
    assert a == b and a != c
    # sample 0 uses the request's own seed with the reference sampler's exact recipe
    reference = list(model.generate(prompt, max_tokens=25, temperature=1.0, top_k=50, seed=7))
    expected = []
    for t in reference:
        if t in engine.end_tokens:
            break
        expected.append(t)
    assert a[0][len(prompt):] == expected

def test_rows_sample_independently_from_the_first_token(tok):
    engine = Engine(tiny_model(tok), tok)  # default init: a near-uniform next-token distribution
    prompt = prompts_of(tok, ["Hello"])[0]
    first_column, _ = generate_columns(engine, prompt, num_samples=8, max_tokens=5, temperature=1.0)[0]
    assert len(set(first_column)) > 1, "every row must draw its own first token"
    results, _ = engine.generate_batch(prompt, num_samples=8, max_tokens=5, temperature=1.0)
    assert len({tuple(r) for r in results}) == 8

def test_top_k_1_and_tiny_top_p_are_greedy(tok, model):
    engine = Engine(model, tok)
    prompt = prompts_of(tok, ["What is two plus"])[0]
    greedy, _ = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)
    top1, _ = engine.generate_batch(prompt, max_tokens=20, temperature=1.0, top_k=1, seed=1)
    nucleus, _ = engine.generate_batch(prompt, max_tokens=20, temperature=1.0, top_p=1e-6, seed=2)
    # values that once overflowed to inf/NaN in fp32 ("probability tensor contains inf/nan")
    tiny_t, _ = engine.generate_batch(prompt, max_tokens=20, temperature=1e-300, seed=3)
    tiny_p, _ = engine.generate_batch(prompt, max_tokens=20, temperature=1.0, top_p=5e-324, seed=4)
    assert greedy == top1 == nucleus == tiny_t == tiny_p

def test_a_row_whose_sampling_fails_ends_alone(tok, model, monkeypatch):
    import nanochat.engine as engine_module
    real = engine_module.sample_token
    def flaky(logits, params, rng):  # the request with seed 666 hits a sampling error
        if params.seed == 666:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real(logits, params, rng)
    monkeypatch.setattr(engine_module, "sample_token", flaky)
    engine = Engine(model, tok)
    prompt = prompts_of(tok, ["What is two plus"])[0]
    alone, _ = engine.generate_batch(prompt, max_tokens=12, temperature=1.0, seed=5)
    decoder = engine.decoder()
    good = decoder.add(prompt, SamplingParams(temperature=1.0, max_tokens=12, seed=5))[0]
    bad = decoder.add(prompt, SamplingParams(temperature=1.0, max_tokens=12, seed=666))[0]
    while decoder.num_rows:
        decoder.step()
    assert bad.finish_reason == "error" and "sampling failed" in bad.error and bad.tokens == []
    assert good.finish_reason == "length" and good.tokens == alone[0][len(prompt):]

def test_top_p_keeps_only_the_nucleus():
    from nanochat.engine import sample_token
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rng = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.8), rng) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are cut
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.81), rng) for _ in range(300)}
    assert draws == {0, 1, 2}

# -----------------------------------------------------------------------------
# Text: UTF-8 safety and stop strings

def test_text_stream_never_splits_a_character(tok):
    text = "héllo wörld 日本語 🎉 ok, naïve café ✓"
    ids = tok.encode(text)
    pieces = [tok.enc.decode_single_token_bytes(i) for i in ids]
    assert any(_partial_utf8(p) for p in pieces), "precondition: some tokens cut a character"
    stream = TextStream(tok.enc.decode_single_token_bytes)
    chunks = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(chunks) == text
    for chunk in chunks:
        assert "\ufffd" not in chunk
        chunk.encode("utf-8")  # a lone surrogate or half character would raise

def _partial_utf8(b):
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True

def test_text_stream_stop_strings_across_token_boundaries(tok):
    text = "The answer is in the details. The end."
    ids = tok.encode(text)
    for stop, expected in [("details", "The answer is in the "), ("s in", "The answer i"), ("zzz", text),
                           ("end.", "The answer is in the details. The ")]:
        stream = TextStream(tok.enc.decode_single_token_bytes, stop=(stop, "never appears"))
        chunks = []
        for i in ids:
            chunks.append(stream.push(i))
            # nothing that belongs to the stop string is ever released
            assert stop not in "".join(chunks)
        chunks.append(stream.flush())
        assert "".join(chunks) == expected
        assert stream.stopped == (stop in text)

def test_engine_stop_strings_end_generation(tok, model):
    engine = Engine(model, tok)
    prompt = prompts_of(tok, ["Once upon a time"])[0]
    full = "".join(generate_text(engine, prompt, max_tokens=40, temperature=0.0))
    assert len(full) > 20
    stop = full[10:14]
    assert stop not in full[:10] + full[10:13]
    cut = "".join(generate_text(engine, prompt, max_tokens=40, temperature=0.0, stop=[stop]))
    assert cut == full[:full.index(stop)]
    results, _ = engine.generate_batch(prompt, max_tokens=40, temperature=0.0, stop=stop)
    full_results, _ = engine.generate_batch(prompt, max_tokens=40, temperature=0.0)
    assert len(results[0]) < len(full_results[0])

# -----------------------------------------------------------------------------
# Tool use, with a model trained to make the call

TOOL_CONVERSATION = {"messages": [
    {"role": "user", "content": "what is 6 times 7?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "sure: "}, {"type": "python", "text": "6*7"},
        # the training data carries a WRONG result: whatever the engine injects comes from the tool
        {"type": "python_output", "text": "41"},
        {"type": "text", "text": " so it is 42 ✓ 日本"}]}]}

@pytest.fixture(scope="module")
def tool_model(tok):
    model = tiny_model(tok, seed=1)
    ids, _ = tok.render_conversation(TOOL_CONVERSATION)
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, "the tiny model should memorise the conversation"
    return model.eval()

def test_tool_call_is_executed_and_its_output_forced(tok, tool_model):
    engine = Engine(tool_model, tok)
    prompt = tok.render_for_completion(TOOL_CONVERSATION)
    # without the tool, the model recites the (wrong) memorised output
    naive = list(tool_model.generate(prompt, max_tokens=14, temperature=0.0))
    out_start, out_end = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
    assert naive[naive.index(out_start) + 1:naive.index(out_end)] == tok.encode("41")

    results, masks = engine.generate_batch(prompt, max_tokens=40, temperature=0.0)
    gen, mask = results[0][len(prompt):], masks[0][len(prompt):]
    i, j = gen.index(out_start), gen.index(out_end)
    assert gen[i:j + 1] == [out_start] + tok.encode("42") + [out_end]
    assert mask[i:j + 1] == [0] * (j + 1 - i), "forced tokens are marked not-sampled"
    assert all(mask[:i]) and all(mask[j + 1:]), "everything else was sampled"
    assert tok.decode(gen[j + 1:]) == " so it is 42 ✓ 日本"

    text = generate_text(engine, prompt, max_tokens=40, temperature=0.0)
    assert "".join(text) == "sure: <<6*7=42>> so it is 42 ✓ 日本"
    assert all("\ufffd" not in chunk for chunk in text)
    # per step: the forced column entries carry mask 0; a finished row yields None afterwards
    columns = generate_columns(engine, prompt, num_samples=2, max_tokens=40, temperature=0.0)
    assert [col[0] for col, _ in columns][:len(gen)] == gen
    assert columns[-1][0] == [tok.encode_special("<|assistant_end|>")] * 2

def test_disallowed_tool_call_injects_nothing(tok, tool_model):
    conversation = {"messages": [TOOL_CONVERSATION["messages"][0], {"role": "assistant", "content": [
        {"type": "text", "text": "sure: "}, {"type": "python", "text": "__import__('os')"}]}]}
    prompt, _ = tok.render_conversation(conversation)
    prompt = prompt[:-1]  # drop <|assistant_end|>: the next token follows <|python_end|>
    engine = Engine(tool_model, tok)
    results, masks = engine.generate_batch(prompt, max_tokens=10, temperature=0.0)
    assert all(masks[0][len(prompt):]), "no forced tokens: the expression was refused"

@pytest.mark.parametrize("expr,expected", [
    ("48/2", "24"), ("6*7", "42"), ("2**10", "1024"), ("1/3", "0.3333333333"), ("-3 + 4.5", "1.5"),
    ("(12 + 30) // 4 % 5", "0"), ("'strawberry'.count('r')", "3"), ("len('hello')", "5"),
    ("round(2.675, 1)", "2.7"), ("max(3, 9, 4)", "9"), ("'Hello'.upper()", "HELLO"), ("1e3 * 2", "2000"),
])
def test_calculator_evaluates(expr, expected):
    assert use_calculator(expr) == expected

@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')", "open('/etc/passwd').read()", "(1).__class__", "9**9**9",
    "'a' * 10**9", "10**5000", "[].__class__.__base__", "lambda: 1", "x + 1", "1/0", "", "1 +",
    "'abc'.format", "print(1)", "2.0 ** 5000", "'%0999999999d' % 1", "[1] * 10**9", "'ab'.join(['x' * 999] * 999)",
    # each of these once took seconds to minutes (or ~1 GB) on the server's decode thread
    "round(1, -10**9)", "round(1.5, 10**9)", "[['a' * 1000] * 1000] * 1000", "[[1] * 999] * 999", "10**10**10",
    "(2**2999)**1000", "max([[['a' * 999] * 999]])",
])
def test_calculator_refuses(expr):
    start = time.perf_counter()
    assert use_calculator(expr) is None
    assert time.perf_counter() - start < 0.1  # the bound; the evaluator's own budget is 50 ms
