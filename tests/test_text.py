"""Tokenizer and chat template against transformers' tokenizer on the same files."""

import pytest

from checkpoints import write_tokenizer
from tpi_mpi.errors import ConfigError
from tpi_mpi.text import Streamer, TextCodec

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "ünïcödé ✓ 漢字", "  two  spaces"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d)
    return d


def test_plain_prompts_tokenize_like_transformers(folder):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folder)
    codec = TextCodec(folder)
    for t in TEXTS:
        assert codec.encode(t) == ref(t)["input_ids"]
        assert codec.decode(codec.encode(t)) == ref.decode(ref(t)["input_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}],
])
def test_chat_template_matches_apply_chat_template(folder, messages):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folder)
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert TextCodec(folder).encode_chat(messages) == list(expected)


def test_streamer_holds_back_incomplete_characters(folder):
    codec = TextCodec(folder)
    ids = codec.tokenizer.encode("漢字 ok", add_special_tokens=False).ids
    s = Streamer(codec)
    deltas = [s.push(i) for i in ids]
    assert "".join(deltas) == "漢字 ok"
    assert all("\ufffd" not in d for d in deltas)


def test_streamed_text_is_the_whole_decode_from_a_few_tokens_at_a_time(folder):
    """Deltas joined equal transformers' decode of all the ids, for text and for random ids (bytes
    that make no character, stray spaces); each token decodes a few ids, not the whole answer."""
    import numpy as np
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folder)
    codec = TextCodec(folder)
    decoded_lengths = []
    decode = codec.decode
    codec.decode = lambda ids: decoded_lengths.append(len(ids)) or decode(ids)
    rng = np.random.default_rng(0)
    cases = [codec.encode(" ".join(TEXTS * 20))]
    cases += [rng.integers(0, codec.tokenizer.get_vocab_size(), 60).tolist() for _ in range(50)]
    for ids in cases:
        s = Streamer(codec)
        text = "".join(s.push(i) for i in ids) + s.finish()
        assert text == s.shown == ref.decode(ids, skip_special_tokens=True)
    assert len(cases[0]) > 200 and max(decoded_lengths) < 20


def test_missing_tokenizer_and_template(tmp_path, folder):
    with pytest.raises(ConfigError, match="tokenizer.json is missing"):
        TextCodec(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    with pytest.raises(ConfigError, match="no chat template"):
        TextCodec(tmp_path).encode_chat([{"role": "user", "content": "x"}])
