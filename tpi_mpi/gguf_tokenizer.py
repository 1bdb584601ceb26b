"""GGUF metadata -> a Hugging Face tokenizer: tokenizer.json (a `tokenizers.Tokenizer`) and
tokenizer_config.json, equal to the vocabulary llama.cpp would build from the same metadata.

Owns only the tokenizer: `meta` is the plain dict of metadata that gguf.py reads from the file
(key -> str, int, float, bool or list). No file is opened here and no MPI is used.
"""

from __future__ import annotations

from .errors import ConfigError

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> how llama.cpp splits text before BPE: (split regex or None for GPT-2's own,
# digits one by one, NFC first, whole words found in the vocabulary skip the merges)
PRE_TOKENIZERS = {
    "gpt-2": (None, False, False, False),
    "smollm": (None, True, False, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, False, True),
    "llama3": (_LLAMA3_SPLIT, False, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, False, True),
    "smaug-bpe": (_LLAMA3_SPLIT, False, False, False),
    "qwen2": (_QWEN2_SPLIT, False, True, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, True, False),
}
CONTROL, USER_DEFINED = 3, 4           # tokenizer.ggml.token_type values


def byte_level_tokenizer(meta: dict, source: str):
    """llama.cpp's "gpt2" vocabulary: byte-level BPE with ranked merges, after the text is split
    the way tokenizer.ggml.pre names."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(f"{source}: tokenizer.ggml.pre {pre!r} is not known to tpi_mpi: put the model's "
                          f"tokenizer.json beside the .gguf file")
    split, digits, nfc, ignore_merges = PRE_TOKENIZERS[pre]
    vocab = {}
    for i, tok in enumerate(meta["tokenizer.ggml.tokens"]):
        vocab.setdefault(tok, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    if not merges:
        raise ConfigError(f"{source}: tokenizer.ggml.merges is missing from a BPE vocabulary: put the model's "
                          f"tokenizer.json beside the .gguf file")
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    else:
        steps += [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_tokenizer(meta: dict, source: str):
    """llama.cpp's "llama" vocabulary: SentencePiece BPE, which merges the pair whose result scores
    highest. As a tokenizers BPE that is one merge per way of cutting a token in two, ranked by its score."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = []
    for piece, score in zip(tokens, scores):
        cuts = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(l, r, score) for l, r in sorted(cuts, key=lambda c: (vocab[c[0]], vocab[c[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab, [(l, r) for l, r, _ in merges], byte_fallback=True, fuse_unk=True,
                               unk_token=tokens[unk] if unk is not None else None))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    # Prepend applies after every special token too, as llama.cpp does ("legacy" in transformers)
    steps = [normalizers.Prepend("\u2581")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def build_tokenizer(meta: dict, source: str):
    """A tokenizers.Tokenizer equal to the one the GGUF metadata describes."""
    from tokenizers import AddedToken, processors

    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        tok = byte_level_tokenizer(meta, source)
    elif model == "llama":
        tok = sentencepiece_tokenizer(meta, source)
    else:
        raise ConfigError(f"{source}: tokenizer.ggml.model is {model!r}; tpi_mpi builds gpt2 and llama "
                          f"tokenizers: put the model's tokenizer.json beside the .gguf file")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])

    add_bos, add_eos = bos_eos_added(meta)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    single, special = "$A", {}
    if add_bos and bos is not None:
        single, special[tokens[bos]] = f"{tokens[bos]} {single}", bos
    if add_eos and eos is not None:
        single, special[tokens[eos]] = f"{single} {tokens[eos]}", eos
    steps = [processors.ByteLevel(trim_offsets=False)] if model == "gpt2" else []
    if special:
        steps.append(processors.TemplateProcessing(single=single, pair=single.replace("$A", "$A $B:1"),
                                                   special_tokens=list(special.items())))
    if steps:
        tok.post_processor = processors.Sequence(steps)
    return tok


def bos_eos_added(meta: dict) -> tuple[bool, bool]:
    """Whether encoding adds BOS and EOS, as llama.cpp decides it."""
    # without the flag llama.cpp adds BOS for a SentencePiece vocabulary and not for BPE
    add_bos = meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")
    return bool(add_bos), bool(meta.get("tokenizer.ggml.add_eos_token", False))


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json's contents: special tokens, BOS/EOS flags and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos, add_eos = bos_eos_added(meta)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos_token_id"),
           "eos_token": token("eos_token_id"), "unk_token": token("unknown_token_id"),
           "pad_token": token("padding_token_id"), "add_bos_token": add_bos, "add_eos_token": add_eos}
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return {k: v for k, v in cfg.items() if v is not None}
