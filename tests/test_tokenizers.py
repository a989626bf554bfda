"""Spec for minflux.tokenizers: the ids equal transformers' CLIPTokenizer / T5Tokenizer (v5) exactly, called
as FLUX calls them (padding="max_length", truncation=True), on the real CLIP vocabulary and a toy T5
SentencePiece model (tests/tokenizer_files.py). Shapes: B prompts, L = max_length.
"""

import json
import shutil

import pytest
import torch
import transformers

from minflux.tokenizers import CLIPTokenizer, T5Tokenizer, overlong
from tests.tokenizer_files import write_clip_tokenizer, write_t5_tokenizer

LONG = ", ".join(f"a photograph of cat number {i} wearing a tiny hat" for i in range(20))
PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A Cat In ThE Hat",
    "café naïve Zürich façade Ångström",
    "decomposed accents: cafe\u0301 nai\u0308ve A\u030angstro\u0308m",
    "an emoji party 🎉🐱🚀 and a heart ❤️",
    "東京タワー の 夜景, 中文 提示词",
    "wow!!! wait... a-b_c (x) [y] {z} #tag @user $5 50% a/b\\c",
    "it's the cat's hat, they're here, we've got it, I'm sure, you'll see, he'd go, don't",
    "digits 1234 and 3.14159 and 1,000,000",
    "   leading and trailing spaces   ",
    "many     inner      spaces",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic space",
    "",
    " ",
    "fullwidth ＡＢＣ and ligature ﬁ and ½",
    "special strings <|startoftext|> <|endoftext|> </s> <pad> <unk> <extra_id_0>",
    "special strings, other case: <|STARTOFTEXT|> <|EndOfText|> </S> <EXTRA_ID_1>",
    LONG,
]


def reference_ids(tokenizer, prompts, max_length) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def first_mismatch(ours: torch.Tensor, ref: torch.Tensor) -> str:
    bad = (ours != ref).any(dim=1).nonzero().flatten().tolist()
    return "" if not bad else f"{PROMPTS[bad[0]]!r}: ours {ours[bad[0]].tolist()} vs {ref[bad[0]].tolist()}"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer_2")
    write_t5_tokenizer(folder)
    return folder


def test_clip_tokenizer_matches_transformers(clip_folder):
    ref = reference_ids(transformers.CLIPTokenizer.from_pretrained(clip_folder), PROMPTS, 77)
    ours = CLIPTokenizer(clip_folder / "vocab.json", clip_folder / "merges.txt")(PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    assert torch.equal(ours, ref), first_mismatch(ours, ref)


def test_clip_rows_are_bos_tokens_eos_then_endoftext_padding(clip_folder):
    ids = CLIPTokenizer(clip_folder / "vocab.json", clip_folder / "merges.txt")(["a photo of a cat", LONG])
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]  # a photo of a cat
    assert (ids[0, 7:] == 49407).all()                                       # pad is <|endoftext|>
    assert ids[1, 0] == 49406 and ids[1, 76] == 49407 and (ids[1, 1:76] != 49407).all()  # truncated, EOS kept


@pytest.mark.parametrize("max_length", [32, 512])
def test_t5_tokenizer_from_spiece_model_matches_transformers(t5_folder, tmp_path, max_length):
    folder = shutil.copytree(t5_folder, tmp_path / "spiece_only")
    (folder / "tokenizer.json").unlink()  # so transformers converts spiece.model itself
    ref = reference_ids(transformers.AutoTokenizer.from_pretrained(folder), PROMPTS, max_length)
    ours = T5Tokenizer(folder / "spiece.model", max_length=max_length)(PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), max_length)
    assert torch.equal(ours, ref), first_mismatch(ours, ref)


@pytest.mark.parametrize("max_length", [32, 512])
def test_t5_tokenizer_from_tokenizer_json_matches_transformers(t5_folder, max_length):
    ref = reference_ids(transformers.AutoTokenizer.from_pretrained(t5_folder), PROMPTS, max_length)
    ours = T5Tokenizer(t5_folder / "tokenizer.json", max_length=max_length)(PROMPTS)
    assert torch.equal(ours, ref), first_mismatch(ours, ref)


def test_t5_tokenizer_json_in_older_saved_format_matches_transformers(t5_folder, tmp_path):
    folder = shutil.copytree(t5_folder, tmp_path / "older")
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [  # as older transformers converters saved it
        spec["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": "▁"}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    ref = reference_ids(transformers.AutoTokenizer.from_pretrained(folder), PROMPTS, 64)
    ours = T5Tokenizer(folder / "tokenizer.json", max_length=64)(PROMPTS)
    assert torch.equal(ours, ref), first_mismatch(ours, ref)


def test_t5_spiece_model_and_tokenizer_json_give_the_same_vocabulary(t5_folder):
    from_model, from_json = T5Tokenizer(t5_folder / "spiece.model"), T5Tokenizer(t5_folder / "tokenizer.json")
    assert from_model.tokenizer.get_vocab() == from_json.tokenizer.get_vocab()
    assert from_model.tokenizer.token_to_id("<extra_id_0>") == from_model.tokenizer.get_vocab_size() - 1


def test_truncated_t5_row_still_ends_with_eos(t5_folder):
    ids = T5Tokenizer(t5_folder / "spiece.model", max_length=32)([LONG, "a cat"])
    # one </s>, at the end; no pad
    assert ids[0, -1] == 1 and (ids[0, :-1] != 1).all() and (ids[0] != 0).all()
    assert ids[1, 0] != 1 and 1 in ids[1].tolist()        # no BOS
    assert (ids[1, ids[1].tolist().index(1) + 1:] == 0).all()  # then <pad>


def test_t5_empty_prompt_is_eos_then_padding(t5_folder):
    assert T5Tokenizer(t5_folder / "tokenizer.json", max_length=4)([""]).tolist() == [[1, 0, 0, 0]]


def test_clip_pad_is_endoftext(clip_folder):
    ids = CLIPTokenizer(clip_folder / "vocab.json", clip_folder / "merges.txt")([""])
    assert ids.tolist() == [[49406] + [49407] * 76]


def test_clip_special_ids_come_from_the_vocabulary(tmp_path):
    tokens = ["<|endoftext|>", "a", "b", "a</w>", "b</w>", "ab</w>", "<|startoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b</w>\n")
    ids = CLIPTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt", max_length=5)(["ab a"])
    assert ids.tolist() == [[6, 5, 3, 0, 0]]


def test_missing_files_raise_file_not_found(tmp_path, clip_folder):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer(tmp_path / "vocab.json", clip_folder / "merges.txt")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer(clip_folder / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        T5Tokenizer(tmp_path / "spiece.model")


def test_clip_vocab_without_endoftext_is_rejected(tmp_path):
    (tmp_path / "vocab.json").write_text('{"<|startoftext|>": 0, "a</w>": 1}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="endoftext"):
        CLIPTokenizer(tmp_path / "vocab.json", tmp_path / "merges.txt")


@pytest.mark.parametrize("content", [b"sentencepiece", bytes(range(256)), b""])
def test_t5_rejects_a_file_that_is_not_a_sentencepiece_model(tmp_path, content):
    (tmp_path / "spiece.model").write_bytes(content)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        T5Tokenizer(tmp_path / "spiece.model")


def test_single_string_is_rejected(clip_folder):
    with pytest.raises(TypeError, match="list of prompts"):
        CLIPTokenizer(clip_folder / "vocab.json", clip_folder / "merges.txt")("a cat")


def test_t5_reports_the_token_count_before_its_cut_and_the_words_it_cuts_off(t5_folder):
    t5 = T5Tokenizer(t5_folder / "spiece.model", max_length=16)
    text = "a red fox running through  the streets of Zürich, 35mm photo"
    count = len(transformers.T5Tokenizer.from_pretrained(t5_folder)(text).input_ids)  # uncut, with </s>
    assert t5.cut(text) == (count, "of Zürich, 35mm photo")
    # exactly those words are lost
    assert torch.equal(t5([text]), t5(["a red fox running through  the streets"]))
    assert t5.cut("a red fox") == (6, "")


def test_t5_marks_a_cut_inside_a_word(t5_folder):
    t5 = T5Tokenizer(t5_folder / "tokenizer.json", max_length=15)
    assert t5.cut("a red fox running through the streets")[1] == "…ts"  # ... ▁st ree | ts


def test_overlong_names_each_text_that_is_cut_with_its_count_and_lost_words(t5_folder):
    t5 = T5Tokenizer(t5_folder / "tokenizer.json", max_length=16)
    texts = [("a.txt", "a red fox"), ("b.txt", "a red fox running through  the streets of Zürich")]
    messages = overlong(t5, texts)
    assert messages == ["b.txt is 23 T5 tokens, over the model's limit of 16; "
                        "these words are cut off: 'of Zürich'"]
