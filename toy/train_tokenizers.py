"""Train the toy model's two tokenizers on its captions and write them in FLUX.1-dev's folders.

tokenizer_2/ is a SentencePiece unigram model with T5's special ids (<pad> 0, </s> 1, <unk> 2, no BOS);
tokenizer/ is a CLIP byte-level BPE (vocab.json + merges.txt). The corpus holds the scene captions and the
recolour task's joint captions, so IC-LoRA captions tokenize into whole words too. Both are checked through
minflux's own tokenizer classes, as the pipeline loads them. Shape letters: N texts.
"""

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import sentencepiece

from minflux.tokenizers import CLIPTokenizer, T5Tokenizer, clip_normalizer, clip_pre_tokenizer
from toy.hf_files import (
    CLIP_EOS,
    N_EXTRA_IDS,
    T5_LENGTH,
    bytes_to_unicode,
    write_clip_tokenizer_files,
    write_t5_tokenizer_files,
)
from toy.world import random_scene, set_caption


def tokenizer_corpus(captions: list[str], task_captions: int, seed: int) -> list[str]:
    """The training captions plus `task_captions` recolour-task joint captions."""
    rng = random.Random(f"task-{seed}")
    return captions + [set_caption(random_scene(rng)) for _ in range(task_captions)]


def train_t5_tokenizer(folder: Path, corpus: list[str], seed: int) -> int:
    """tokenizer_2/: spiece.model (unigram, T5's special ids) + configs. Returns the vocabulary size, the
    sentinels included.

    SentencePiece's seed search finds only a few dozen candidates in a language of ~40 words that always come
    in the same order, and then splits words into letters; shuffling the words of each caption (punctuation
    split off) shows every word in many contexts, and it learns one piece per word."""
    rng = random.Random(f"spm-{seed}")
    lines = []
    for text in corpus:
        words = text.replace(",", " ,").replace(";", " ;").split()
        rng.shuffle(words)
        lines.append(" ".join(words))
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:!?'\"()-"
    lines.append(" ".join(alphabet))  # every character seen once, so no text tokenizes to <unk>
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="unigram", vocab_size=256,
        hard_vocab_limit=False, character_coverage=1.0, split_by_unicode_script=False, num_threads=1,
        minloglevel=2, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>")
    pieces = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    write_t5_tokenizer_files(folder, model.getvalue(), pieces)
    return pieces + N_EXTRA_IDS


def bpe_merges(corpus: list[str], min_frequency: int = 2) -> list[str]:
    """Byte-level BPE merges learnt greedily from the corpus: repeatedly merge the most frequent adjacent pair
    of symbols (a word's last symbol carries "</w>") until no pair occurs min_frequency times. Equal counts
    are broken by the pair itself, so two runs write the same merges.txt (the tokenizers library's
    BpeTrainer orders ties arbitrarily)."""
    normalizer = clip_normalizer()  # the text pipeline of minflux's CLIPTokenizer
    splitter = clip_pre_tokenizer()
    counts = Counter()
    for text in corpus:
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] += 1
    words = {w: [*w[:-1], w[-1] + "</w>"] for w in counts}
    merges = []
    while True:
        pairs = Counter()
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):  # each symbol and its right neighbour
                pairs[pair] += counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        for w, symbols in words.items():
            merged = []
            i = 0
            while i < len(symbols):
                if tuple(symbols[i:i + 2]) == best:
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[w] = merged
    return [" ".join(pair) for pair in merges]


def train_clip_tokenizer(folder: Path, corpus: list[str]) -> int:
    """tokenizer/: a byte-level BPE in OpenAI CLIP's files and id order (256 bytes, the same with </w>, one
    token per merge, <|startoftext|>, <|endoftext|> last) + configs. Returns the vocabulary size."""
    return len(write_clip_tokenizer_files(folder, bpe_merges(corpus)))


def squash(text: str) -> str:
    """The text without any whitespace."""
    return "".join(text.split())


def clip_bytes(ids: list[int], clip_tokens: dict[int, str], from_bytes: dict[str, int]) -> bytes:
    """The bytes that CLIP token ids stand for: each token's characters mapped back to bytes, </w> dropped."""
    text_bytes = bytearray()
    for token_id in ids:
        for char in clip_tokens[token_id].removesuffix("</w>"):
            text_bytes.append(from_bytes[char])
    return bytes(text_bytes)


def check_tokenizers(repo: Path, texts: list[str]) -> dict[str, float]:
    """Every text must come back from minflux's tokenizers (as the pipeline loads them) without an unknown
    token, equal up to whitespace (CLIP also lowercases; like the real one it cuts long texts at 77 tokens, so
    a cut row must give a prefix). Returns the mean token counts."""
    t5 = T5Tokenizer(repo / "tokenizer_2" / "spiece.model", max_length=T5_LENGTH)
    clip = CLIPTokenizer(repo / "tokenizer" / "vocab.json", repo / "tokenizer" / "merges.txt")
    pieces = {i: p for p, i in t5.tokenizer.get_vocab().items()}
    clip_tokens = {i: t for t, i in json.loads((repo / "tokenizer" / "vocab.json").read_text()).items()}
    from_bytes = {c: b for b, c in bytes_to_unicode().items()}
    eos = clip.tokenizer.token_to_id(CLIP_EOS)
    t5_ids = t5(texts).tolist()                                                         # (N, 512)
    clip_ids = clip(texts).tolist()                                                     # (N, 77)
    for text, t5_row, clip_row in zip(texts, t5_ids, clip_ids, strict=True):
        body = t5_row[: t5_row.index(1)]  # up to </s>
        back = "".join(pieces[i] for i in body).replace("▁", " ")
        if 2 in body or squash(back) != squash(text):
            raise RuntimeError(f"T5 tokenizer round trip failed: {text!r} -> {back!r}")
        body = clip_row[1 : clip_row.index(eos)]  # between <|startoftext|> and <|endoftext|>
        text_bytes = clip_bytes(body, clip_tokens, from_bytes)
        back = squash(text_bytes.decode("utf-8", errors="replace"))
        full = squash(text.lower())
        was_cut = len(clip_row) == clip_row.index(eos) + 1  # the row ends at 77 tokens with <|endoftext|>
        if back != full and not (was_cut and full.startswith(back)):
            raise RuntimeError(f"CLIP tokenizer round trip failed: {text!r} -> {text_bytes!r}")
    return {"t5": float(np.mean([row.index(1) + 1 for row in t5_ids])),
            "clip": float(np.mean([row.index(eos) + 1 for row in clip_ids]))}
