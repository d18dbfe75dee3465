"""The HTTP layer's incremental detokenizer and stop strings, against the tiny model's byte-level BPE tokenizer."""
from __future__ import annotations

import pytest

from serving.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream(tokenizer, ids, stop=(), prompt=(1,), step=1):
    detokenizer = IncrementalDetokenizer(tokenizer, list(prompt), stop)
    deltas = []
    for start in range(0, len(ids), step):
        deltas.append(detokenizer.add(ids[start:start + step]))
        if detokenizer.stopped:
            break
    deltas.append(detokenizer.finish())
    return deltas, detokenizer


TEXT = "Héllo wörld — 世界 🙂 says the GPU ✓."


@pytest.mark.parametrize("step", [1, 2, 5])
def test_multibyte_text_streams_without_replacement_characters(tokenizer, step):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # Byte-level BPE over an English corpus: the non-ASCII characters are split into byte tokens.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    deltas, detokenizer = stream(tokenizer, ids, step=step)
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in delta for delta in deltas)
    assert not detokenizer.stopped


def test_context_from_the_prompt_keeps_leading_spaces(tokenizer):
    prompt = tokenizer.encode("The quick brown", add_special_tokens=False)
    ids = tokenizer.encode("The quick brown fox jumps", add_special_tokens=False)[len(prompt):]
    deltas, _ = stream(tokenizer, ids, prompt=prompt)
    assert "".join(deltas) == " fox jumps"


def test_stop_string_spanning_tokens_is_cut_and_never_sent(tokenizer):
    ids = tokenizer.encode("Hello world! How are you today?", add_special_tokens=False)
    deltas, detokenizer = stream(tokenizer, ids, stop=["are you", "zzz"])
    assert "".join(deltas) == "Hello world! How "
    assert detokenizer.stopped
    assert not any("are" in delta for delta in deltas)


def test_partial_stop_string_is_held_back_then_released(tokenizer):
    ids = tokenizer.encode("Hello world! How are you today?", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [1], ["you there"])
    sent = ""
    for token in ids:
        sent += detokenizer.add([token])
        # Whatever could still become "you there" stays unsent.
        assert not sent.endswith(("y", "yo", "you", "you "))
    sent += detokenizer.finish()
    assert sent == "Hello world! How are you today?" and not detokenizer.stopped


def test_a_long_stop_string_costs_memory_in_proportion_to_its_length(tokenizer):
    import tracemalloc

    # Keeping every prefix of a 5,000-character stop string took 12.5 MB (its square); the rolling tail keeps none.
    stop = "ab" * 2500
    tracemalloc.start()
    try:
        detokenizer = IncrementalDetokenizer(tokenizer, [1], [stop, "c" * 300])
        ids = tokenizer.encode("ab ab ab", add_special_tokens=False)
        text = "".join(detokenizer.add([token]) for token in ids) + detokenizer.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert text == "ab ab ab" and not detokenizer.stopped
    assert peak < 1_000_000, f"{peak} bytes traced"


def test_held_back_text_is_the_longest_end_that_starts_a_stop_string(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [1], ["abcab!", "zz"])
    sent = detokenizer.add(tokenizer.encode("xx abcab", add_special_tokens=False))
    assert sent == "xx " and detokenizer._held == "abcab"
    sent = detokenizer.add(tokenizer.encode("c", add_special_tokens=False))
    assert sent == "abc" and detokenizer._held == "abc"  # "abcabc" ends with "abc", the start of "abcab!"
    assert detokenizer.add(tokenizer.encode("ab!", add_special_tokens=False)) == "" and detokenizer.stopped


def test_stop_string_in_the_first_token_gives_empty_text(tokenizer):
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    deltas, detokenizer = stream(tokenizer, ids, stop=["H"])
    assert "".join(deltas) == "" and detokenizer.stopped


def test_special_tokens_are_not_text(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer.encode("Hello", add_special_tokens=False) + [eos] + tokenizer.encode(" world",
                                                                                        add_special_tokens=False)
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == "Hello world"


def test_invalid_bytes_from_the_model_do_not_stall_the_stream(tokenizer):
    # UTF-8 lead bytes that never complete always decode to a trailing U+FFFD: held only a few tokens.
    lead = tokenizer.convert_tokens_to_ids("Ã")  # byte-level BPE's symbol for byte 0xC3
    ids = [lead] * 12
    deltas, _ = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == "\ufffd" * 12
    assert "".join(deltas[:-1])  # sent while streaming, not only by finish()
    assert all(delta == "" for delta in deltas[:5])  # but held while a character could still complete


def test_fast_tokenizers_decode_through_the_rust_tokenizer_with_the_same_text(tokenizer):
    import random

    from serving.detokenizer import _decoder

    decode = _decoder(tokenizer)
    assert decode.func == tokenizer.backend_tokenizer.decode  # not transformers' argument handling
    rng = random.Random(0)
    for _ in range(300):  # special tokens included: both skip them
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 8))]
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_a_tokenizer_that_changes_decoding_keeps_its_own_decode(tokenizer):
    from serving.detokenizer import _decoder

    class Shouting(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs).upper()

    shouting = Shouting(tokenizer_object=tokenizer.backend_tokenizer)
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    assert _decoder(shouting)(ids) == "HELLO WORLD"


def _python_only(tokenizer):
    """The same tokenizer with a `_decode` of its own, so the detokenizer decodes its window in Python."""
    class Plain(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return super()._decode(token_ids, **kwargs)

    return Plain(tokenizer_object=tokenizer.backend_tokenizer)


def _sentencepiece():
    """A Llama-2-style tokenizer: SentencePiece's "▁" for spaces, byte-fallback tokens, and a decoder that strips
    the first token's leading space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    for word in ["▁", "▁Hello", "▁world", "Hello", "world", "▁the", "▁a", "a", "b", "!",
                 "▁▁", "é", "▁é", "▁世界", "x", "▁x"]:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level BPE", "SentencePiece"])
def any_tokenizer(request, tokenizer):
    if request.param == "SentencePiece":
        fragments = [f"<0x{byte:02X}>" for byte in (0xE4, 0xB8, 0xAD, 0xC3, 0xA9, 0xF0, 0x9F, 0x99, 0x82)]
        return _sentencepiece(), fragments, "Hello world the a! é 世界 x"
    return tokenizer, ["Ã", "¤", "â", "ł"], TEXT + " Hello world, the quick brown fox."


def test_a_word_after_a_skipped_special_token_keeps_its_leading_space(any_tokenizer):
    tokenizer, _, _ = any_tokenizer
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    vocab = tokenizer.get_vocab()
    word = [vocab["\u2581world"]] if "\u2581world" in vocab else tokenizer.encode(" world", add_special_tokens=False)
    ids = [tokenizer.eos_token_id, *word]
    for candidate in (tokenizer, _python_only(tokenizer)):  # the Rust stream and the Python window alike
        deltas, _ = stream(candidate, ids, prompt=prompt)
        assert "".join(deltas) == " world"


TRIALS = 400


def test_rust_stream_and_python_window_send_the_same_text_for_random_tokens(any_tokenizer):
    import random

    tokenizer, fragments, sample = any_tokenizer
    plain = _python_only(tokenizer)
    assert IncrementalDetokenizer(tokenizer, [5])._stream is not None
    assert IncrementalDetokenizer(plain, [5])._stream is None
    rng = random.Random(0)
    byte_tokens = [tokenizer.convert_tokens_to_ids(symbol) for symbol in fragments]  # UTF-8 fragments
    words = tokenizer.encode(sample, add_special_tokens=False)
    specials = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    for trial in range(TRIALS):
        pool = [lambda: rng.randrange(len(tokenizer)), lambda: rng.choice(byte_tokens), lambda: rng.choice(words),
                lambda: rng.choice(words), lambda: rng.choice(specials)]
        ids = [rng.choice(pool)() for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 8))]
        step = rng.randint(1, 4)
        fast, _ = stream(tokenizer, ids, prompt=prompt, step=step)
        slow, _ = stream(plain, ids, prompt=prompt, step=step)
        assert "".join(fast) == "".join(slow), (trial, prompt, ids, step)
        # Nothing is sent early: a delta ends in U+FFFD only where the whole text has one there too.
        whole = "".join(slow)
        assert all(whole.count("\ufffd") >= delta.count("\ufffd") for delta in fast)
        # One stop string, from the text or not: the text ends right before its first occurrence.
        start = rng.randrange(len(whole) + 1)
        stop = whole[start:start + rng.randint(1, 6)] if rng.random() < 0.8 else "zq"
        if not stop:
            continue
        cut, detokenizer = stream(tokenizer, ids, prompt=prompt, step=step, stop=[stop])
        assert "".join(cut) == (whole[:whole.find(stop)] if stop in whole else whole), (trial, stop)
        assert detokenizer.stopped == (stop in whole)


def test_a_refused_rust_step_hands_the_request_to_the_python_window(tokenizer, monkeypatch):
    import serving.detokenizer as module

    real = module.DecodeStream

    class Refusing:
        """A Rust stream that refuses its third step, as tokenizers does on a decoder's non-monotonic output."""

        def __init__(self, **kwargs):
            self.inner, self.steps = real(**kwargs), 0

        def step(self, backend, ids):
            self.steps += 1
            if self.steps == 3:
                raise Exception("Invalid prefix encountered")
            return self.inner.step(backend, ids)

    monkeypatch.setattr(module, "DecodeStream", Refusing)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, detokenizer = stream(tokenizer, ids, prompt=tokenizer.encode("Say", add_special_tokens=False))
    assert "".join(deltas) == TEXT  # taken over after the refusal: nothing lost or repeated
    assert detokenizer._stream is None
