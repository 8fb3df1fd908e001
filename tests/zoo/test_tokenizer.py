import json

from dmquant.zoo import data, path
from dmquant.zoo.tokenizer import BOS, EOS, build_tokenizer, build_vocab


def test_every_grammar_word_is_one_token():
    tok = build_tokenizer()
    for w in data.vocabulary():
        assert tok.tokenize(w) == [w + "</w>"], w
    ids = tok("a large red circle at the top left on a black background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 14


def test_end_of_text_has_the_largest_id_and_unknown_text_still_tokenizes():
    vocab, _ = build_vocab()
    assert vocab[EOS] == max(vocab.values()) and vocab[BOS] == vocab[EOS] - 1
    tok = build_tokenizer()
    ids = tok("A zebra, 12!").input_ids
    assert tok.unk_token_id not in ids[1:-1] and len(ids) > 4


def test_shipped_tokenizers_match_the_builder(tmp_path):
    build_tokenizer(tmp_path)
    fresh = json.loads((tmp_path / "vocab.json").read_text())
    for folder in (path("tiny-shapes-sd") / "tokenizer", path("tiny-shapes-clip")):
        assert json.loads((folder / "vocab.json").read_text()) == fresh
        assert (folder / "merges.txt").read_text() == (tmp_path / "merges.txt").read_text()
