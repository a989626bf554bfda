"""Writers for tokenizer folders laid out like the official FLUX repo's `tokenizer/` and `tokenizer_2/`.

`write_clip_tokenizer` writes the real OpenAI CLIP BPE vocabulary (49,408 tokens, 48,894 merges), rebuilt
offline from the `bpe_simple_vocab_16e6.txt.gz` that ships in the open_clip_torch wheel (the same files as the
official tokenizer/ folder). `write_t5_tokenizer` trains a small SentencePiece unigram model in-process with
T5's special ids (`<pad>` 0, `</s>` 1, `<unk>` 2, no BOS) and writes `spiece.model` plus the `tokenizer.json`
that transformers itself builds from it (T5's layout: pieces, then the 100 sentinels). Plain functions, usable
by any test.
"""

import gzip
import importlib.util
import io
from pathlib import Path

import sentencepiece

from toy.hf_files import clip_vocab, write_clip_tokenizer_files, write_t5_tokenizer_files

N_CLIP_MERGES = 48894

_clip_files: tuple[dict[str, int], list[str]] | None = None  # (vocab, merges), built once per process

def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The openai/clip-vit-large-patch14 vocab.json contents and merge lines, from open_clip's BPE file."""
    global _clip_files
    if _clip_files is None:
        folder = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
        with gzip.open(folder / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1:N_CLIP_MERGES + 1]  # line 0 is a header
        _clip_files = (clip_vocab(merges), merges)
    return _clip_files
def write_clip_tokenizer(folder) -> Path:
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json of FLUX's `tokenizer/`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_tokenizer_files(folder, clip_vocab_and_merges()[1])
    return folder


def caption_corpus() -> list[str]:
    """Deterministic, varied English image captions (some accents and punctuation) to train the toy T5
    model."""
    subjects = ["a red fox", "two old fishermen", "an astronaut", "the Eiffel tower", "a bowl of ramen",
                "a tabby cat", "a vintage convertible", "three children", "a lonely lighthouse",
                "the café owner", "a naïve robot", "a hot-air balloon", "my grandmother's garden",
                "a golden retriever", "an ancient samurai", "the Brooklyn bridge", "a wizard with a staff",
                "a small wooden cabin", "a mechanical dragon", "QUEEN ELIZABETH", "a jellyfish",
                "twelve penguins", "a steaming cup of espresso", "Mount Fuji"]
    actions = ["standing in", "painted over", "floating above", "running through", "sleeping beside",
               "glowing inside", "reflected in", "hiding behind", "dancing on", "overlooking"]
    places = ["a snowy forest at dawn", "the streets of Zürich", "a neon-lit city, 1984", "an empty beach",
              "a misty valley!", "the kitchen's window", "a field of sunflowers...", "Mars; photorealistic",
              "a crowded marketplace", "the frozen lake", "an abandoned subway station", "a thunderstorm"]
    styles = ["oil painting", "35mm photo, f/1.8", "watercolor", "studio lighting", "8K, highly detailed",
              "in the style of ukiyo-e", "cinematic", "(masterpiece)", "it's raining", "they're smiling",
              "trending on artstation", "black and white", "low-poly 3D render", "charcoal sketch", "bokeh"]
    return [f"{s} {a} {p}, {styles[(i + 2 * j + 3 * k) % len(styles)]}"
            for i, s in enumerate(subjects) for j, a in enumerate(actions) for k, p in enumerate(places)]


def train_spiece_model(vocab_size: int) -> bytes:
    """A serialized SentencePiece unigram model with T5's special pieces and the default nmt_nfkc normalizer.

    `vocab_size` is an upper bound: the small corpus supports only a couple of hundred pieces."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus()), model_writer=model, model_type="unigram",
        vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>")
    return model.getvalue()


def _pieces(model: bytes) -> list[str]:
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def write_t5_tokenizer(folder, vocab_size: int = 256) -> int:
    """spiece.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json of FLUX's
    `tokenizer_2/`.

    Returns the tokenizer's vocabulary size: the SentencePiece pieces plus the 100 `<extra_id_N>` sentinels
    that transformers puts on top of them (`<extra_id_0>` is the last id), i.e. the T5 embedding rows
    needed."""
    from transformers import T5Tokenizer as ReferenceT5Tokenizer

    folder, model = Path(folder), train_spiece_model(vocab_size)
    pieces = _pieces(model)
    ids = write_t5_tokenizer_files(folder, model, len(pieces))
    # only spiece.model so far: transformers converts it
    reference = ReferenceT5Tokenizer.from_pretrained(folder)
    reference.backend_tokenizer.save(str(folder / "tokenizer.json"))
    if reference.get_vocab() != {**{p: i for i, p in enumerate(pieces)}, **ids}:
        raise AssertionError("transformers laid out the T5 vocabulary differently from T5's "
                             "(pieces, then the sentinels)")
    return len(reference)
