"""The two FLUX text tokenizers, built on the `tokenizers` library; both cut the tokens so that the closing
special token always stays. Shapes: B prompts, L = max_length tokens.

CLIPTokenizer: OpenAI CLIP's byte-level BPE from `tokenizer/vocab.json` + `merges.txt`, with the text pipeline
of transformers' CLIPTokenizer: NFC, whitespace runs -> one space, lowercase, CLIP's regex split,
byte-to-unicode map, `</w>` on each word's last symbol. Rows are `<|startoftext|> tokens… <|endoftext|>`,
padded with `<|endoftext|>`. T5Tokenizer: T5's SentencePiece unigram model from `tokenizer_2/spiece.model` or
`tokenizer.json`, with the pipeline of transformers' T5Tokenizer: the model's precompiled normalizer, split on
whitespace, "▁" before every word, the 100 `<extra_id_N>` sentinels on top of the pieces. Rows are
`tokens… </s>` (no BOS), padded with `<pad>`.
"""

import base64
import json
import struct
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
              r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _existing(path) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Path(path)


def _framed(tok: Tokenizer, first: list[str], last: str, pad: str, max_length: int, source) -> Tokenizer:
    """Rows of exactly max_length ids: first + tokens (cut to fit) + last, then pad."""
    specials = {t: tok.token_to_id(t) for t in [*first, last, pad]}
    missing = [t for t, i in specials.items() if i is None]
    if missing:
        raise ValueError(f"{source}: the vocabulary has no {', '.join(missing)}")
    template = [*first, "$A", last]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=list(specials.items()))
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=specials[pad], pad_token=pad)
    return tok


def _encode(tok: Tokenizer, prompts: list[str]) -> torch.Tensor:
    if isinstance(prompts, str):
        raise TypeError("tokenizers take a list of prompts, got a single string")
    return torch.tensor([row.ids for row in tok.encode_batch(prompts)], dtype=torch.long)       # (B, L)


def clip_normalizer() -> normalizers.Normalizer:
    """CLIP's text clean-up: NFC, whitespace runs -> one space, lowercase."""
    one_space = normalizers.Replace(Regex(r"\s+"), " ")
    return normalizers.Sequence([normalizers.NFC(), one_space, normalizers.Lowercase()])


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """CLIP's split into words (CLIP_SPLIT), each mapped to byte-level characters."""
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])


class CLIPTokenizer:
    """prompts -> (B, max_length) ids of vocab.json, in rows
    `<|startoftext|> tokens… <|endoftext|> <|endoftext|>…`."""

    def __init__(self, vocab_file, merges_file, max_length: int = 77):
        bos, eos = "<|startoftext|>", "<|endoftext|>"
        bpe = BPE.from_file(str(_existing(vocab_file)), str(_existing(merges_file)), unk_token=eos,
                            continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.normalizer = clip_normalizer()
        tok.pre_tokenizer = clip_pre_tokenizer()
        framed = _framed(tok, [bos], eos, eos, max_length, vocab_file)  # checks bos/eos before they are added
        framed.add_special_tokens([AddedToken(bos, normalized=True), AddedToken(eos, normalized=False)])
        self.max_length = max_length
        self.tokenizer = framed

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return _encode(self.tokenizer, prompts)                                                  # (B, L)


def _protobuf_fields(data: bytes):
    """(field number, value) pairs of a serialized protobuf message: ints for varints, raw bytes otherwise."""
    def varint():
        nonlocal i
        value = shift = 0
        while data[i] & 0x80:  # a set high bit: more 7-bit groups follow
            value |= (data[i] & 0x7F) << shift
            shift += 7
            i += 1
        i += 1
        return value | data[i - 1] << shift

    i = 0
    while i < len(data):
        field, wire = divmod(varint(), 8)
        if wire == 0:
            yield field, varint()
            continue
        if wire == 2:  # length-delimited
            size = varint()
        elif wire == 1:  # fixed64
            size = 8
        else:  # fixed32
            size = 4
        i += size
        yield field, data[i - size:i]


def _read_spiece(path: Path) -> tuple[list[tuple[str, float]], bytes | None]:
    """The (piece, score) list and precompiled normalizer (fields 1 and 3) of a sentencepiece ModelProto."""
    pieces, charsmap = [], None
    try:
        for field, value in _protobuf_fields(path.read_bytes()):
            if field == 1:
                piece = dict(_protobuf_fields(value))  # 1: the piece, 2: its score (a float32; 0 if absent)
                text = piece[1].decode("utf-8")
                score = struct.unpack("<f", piece.get(2, bytes(4)))[0]
                pieces.append((text, score))
            elif field == 3:
                charsmap = dict(_protobuf_fields(value)).get(2)
    except (IndexError, KeyError, TypeError, AttributeError, UnicodeDecodeError, struct.error):
        pieces = []
    if not pieces:
        raise ValueError(f"{path}: not a SentencePiece model")
    return pieces, charsmap


def _read_tokenizer_json(path: Path) -> tuple[list[tuple[str, float]], bytes | None]:
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec["model"].get("type", "Unigram") != "Unigram":
        raise ValueError(f"{path}: expected a Unigram (SentencePiece) model, got {spec['model']['type']}")
    normalizer = spec.get("normalizer") or {}
    charsmaps = [n["precompiled_charsmap"] for n in normalizer.get("normalizers", [normalizer])
                 if n.get("type") == "Precompiled"]
    charsmap = base64.b64decode(charsmaps[0]) if charsmaps else None
    return [tuple(p) for p in spec["model"]["vocab"]], charsmap


class T5Tokenizer:
    """prompts -> (B, max_length) ids `tokens… </s> <pad>…`, from a `spiece.model` or a `tokenizer.json`."""

    def __init__(self, path, max_length: int = 512):
        path = _existing(path)
        pieces, charsmap = _read_tokenizer_json(path) if path.suffix == ".json" else _read_spiece(path)
        if not any(p.startswith("<extra_id_") for p, _ in pieces):  # sentinels go after the pieces, 99 first
            pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
        ids = {p: i for i, (p, _) in enumerate(pieces)}
        tok = Tokenizer(Unigram(pieces, unk_id=ids.get("<unk>"), byte_fallback=False))
        if charsmap:
            tok.normalizer = normalizers.Precompiled(charsmap)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always", split=True)])
        framed = _framed(tok, [], "</s>", "<pad>", max_length, path)
        framed.add_special_tokens(["<pad>", "</s>", "<unk>", *(p for p in ids if p.startswith("<extra_id_"))])
        self.max_length = max_length
        self.tokenizer = framed
        self.uncut = Tokenizer.from_str(framed.to_str())
        self.uncut.no_truncation()
        self.uncut.no_padding()

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return _encode(self.tokenizer, prompts)                                                  # (B, L)

    def cut(self, text: str) -> tuple[int, str]:
        """The text's token count with `</s>`, before any cut, and the end of the text that is cut off ("" if
        nothing is)."""
        encoding = self.uncut.encode(text)
        n = len(encoding.ids)
        if n <= self.max_length:
            return n, ""
        start = encoding.offsets[self.max_length - 1][0]  # the first token with no room before `</s>`
        mid_word = start and not text[start - 1].isspace()
        return n, ("…" if mid_word else "") + text[start:]


def overlong(tokenizer: T5Tokenizer, named_texts: list[tuple[str, str]]) -> list[str]:
    """A message for each (name, text) that T5 reads only in part: its token count and the words cut off."""
    messages = []
    for name, text in named_texts:
        n, cut = tokenizer.cut(text)
        if cut:
            messages.append(f"{name} is {n} T5 tokens, over the model's limit of {tokenizer.max_length}; "
                            f"these words are cut off: {cut!r}")
    return messages
