"""The built-in byte tokenizer and its streaming decoder."""

from __future__ import annotations

from model import preset
from model.tokenizer import ByteTokenizer, load_tokenizer


def test_bytes_round_trip_and_specials():
    tok = load_tokenizer(preset("tiny"), None)
    assert isinstance(tok, ByteTokenizer) and (tok.bos_id, tok.eos_id) == (256, 257)
    text = "naïve 🙂 memory"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


def test_stream_decoder_waits_for_whole_characters():
    tok = ByteTokenizer()
    dec = tok.stream_decoder()
    out = [dec.push(i) for i in "é🙂".encode()]
    assert out == ["", "é", "", "", "", "🙂"]
    assert dec.push(tok.eos_id) == ""


def test_stream_decoder_flush_emits_what_was_held_back():
    dec = ByteTokenizer().stream_decoder()
    assert [dec.push(i) for i in "a🙂".encode()[:3]] == ["a", "", ""]
    assert dec.flush() == "\ufffd"
