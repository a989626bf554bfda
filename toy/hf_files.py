"""Files of the official FLUX HF repo layout that the toy model's builder and the tests both write.

`write_clip_tokenizer_files` writes a `tokenizer/` folder (vocab.json, merges.txt and the two configs) for any
byte-level BPE merge list, with ids in OpenAI CLIP's order: the 256 byte characters, the same with `</w>`, one
token per merge, then `<|startoftext|>` and `<|endoftext|>`. `write_t5_tokenizer_files` writes a `tokenizer_2/`
folder (spiece.model and the two configs) for any SentencePiece model with T5's special ids.
"""

import json
from pathlib import Path

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
N_EXTRA_IDS = 100  # T5's <extra_id_N> sentinels, put on top of the SentencePiece pieces

MODEL_INDEX = {
    "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
}


def write_json(path: Path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def added_token(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
            "special": True}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [256 + i for i in range(len(others))])}


def clip_vocab(merges: list[str]) -> dict[str, int]:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise RuntimeError("two BPE merges make the same token; CLIP's vocab.json cannot hold that")
    return vocab


def write_clip_tokenizer_files(folder: Path, merges: list[str]) -> dict[str, int]:
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json; returns the vocabulary."""
    vocab = clip_vocab(merges)
    write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(vocab[CLIP_BOS]): added_token(CLIP_BOS, True),
                                 str(vocab[CLIP_EOS]): added_token(CLIP_EOS, False)},
        "bos_token": CLIP_BOS, "clean_up_tokenization_spaces": True, "do_lower_case": True, "eos_token": CLIP_EOS,
        "errors": "replace", "model_max_length": 77, "pad_token": CLIP_EOS, "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS})
    special = {k: v for k, v in added_token(CLIP_EOS, False).items() if k != "special"}
    write_json(folder / "special_tokens_map.json", {
        "bos_token": {**special, "content": CLIP_BOS, "normalized": True}, "eos_token": special,
        "pad_token": CLIP_EOS, "unk_token": special})
    return vocab


def write_t5_tokenizer_files(folder: Path, spiece_model: bytes, num_pieces: int) -> dict[str, int]:
    """spiece.model, tokenizer_config.json, special_tokens_map.json for a SentencePiece model of num_pieces pieces
    with T5's special ids (<pad> 0, </s> 1, <unk> 2); returns the ids of those and of the 100 sentinels, which
    transformers puts after the pieces in reverse (`<extra_id_0>` is the last id)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(spiece_model)
    extras = [f"<extra_id_{i}>" for i in range(N_EXTRA_IDS)]
    ids = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {t: num_pieces + N_EXTRA_IDS - 1 - i for i, t in enumerate(extras)}
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": True,
        "added_tokens_decoder": {str(i): added_token(t, False) for t, i in sorted(ids.items(), key=lambda x: x[1])},
        "additional_special_tokens": extras, "clean_up_tokenization_spaces": True, "eos_token": "</s>",
        "extra_ids": N_EXTRA_IDS, "legacy": True, "model_max_length": 512, "pad_token": "<pad>",
        "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"})
    plain = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    write_json(folder / "special_tokens_map.json", {
        "additional_special_tokens": extras, "eos_token": {"content": "</s>", **plain},
        "pad_token": {"content": "<pad>", **plain}, "unk_token": {"content": "<unk>", **plain}})
    return ids
