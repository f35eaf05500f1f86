"""A real CLIP BPE tokenizer built offline from the vocabulary file that open_clip_torch ships.

The hub is out of reach on the machines this runs on, so instead of `CLIPTokenizer.from_pretrained`
the 49,408-token vocabulary is rebuilt exactly the way open_clip's `SimpleTokenizer` does it. The ids
match `openai/clip-vit-large-patch14` (what SD 1.x / SDXL use), so prompts tokenize like the real models.
"""

from __future__ import annotations

import gzip
import importlib.util
import pathlib
from functools import lru_cache
from typing import TYPE_CHECKING

from transformers import CLIPTokenizer

if TYPE_CHECKING:
    from transformers import T5TokenizerFast

__all__ = [
    "CLIP_MAX_LENGTH",
    "CLIP_VOCAB_SIZE",
    "bpe_vocab_path",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "clip_vocab_and_merges",
    "t5_vocab_size",
]

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# open_clip keeps this many merges: 49,408 tokens minus 256 byte tokens, 256 '</w>' tokens and 2 specials.
_NUM_MERGES = 49152 - 256 - 2


def bpe_vocab_path() -> pathlib.Path:
    """Return the path of open_clip's BPE vocabulary file without importing open_clip.

    open_clip is installed with --no-deps (it would otherwise pull torchvision / a CUDA torch), so
    importing it may fail; `find_spec` on a top-level package only locates it, it does not execute it.
    """
    hint = "the offline presets need open_clip's BPE vocabulary: run `pip install --no-deps open_clip_torch`"
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError) as exc:
        raise RuntimeError(hint) from exc
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = pathlib.Path(location) / _BPE_FILE
        if candidate.is_file():
            return candidate
    raise RuntimeError(f"{_BPE_FILE} not found ({hint})")


def _bytes_to_unicode() -> dict[int, str]:
    # Same table as GPT-2 / open_clip: printable bytes map to themselves, the rest are shifted past 255
    # so that every byte has a visible, non-whitespace character the BPE can operate on.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Return CLIP's (token → id vocabulary, ordered BPE merges), exactly as open_clip builds them."""
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # Line 0 is a version header; open_clip's slice keeps exactly _NUM_MERGES merges.
    merges = tuple(tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1])
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"unexpected contents in {bpe_vocab_path()}: {len(vocab)} tokens")
    return vocab, merges  # type: ignore[return-value]


def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Build the CLIP ViT-L/14 tokenizer (49,408 tokens, max length 77) offline.

    `pad_token` is "<|endoftext|>" for SD 1.x and SDXL's first tokenizer; SDXL's second tokenizer
    (from OpenCLIP bigG) pads with "!".
    """
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


# ---- T5 (FLUX's and Kandinsky 3's text encoders) ------------------------------------------------
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"


@lru_cache(maxsize=1)
def t5_pieces() -> tuple[str, ...]:
    """The pieces of the offline T5 tokenizer, in id order: T5's special tokens at T5's ids
    (pad 0, eos 1, unk 2), every whole word of the CLIP vocabulary as a "▁word" piece, then
    single characters with and without "▁", so any ASCII text tokenizes without <unk>."""
    vocab, _ = clip_vocab_and_merges()
    words = sorted(
        {t[: -len("</w>")] for t in vocab if t.endswith("</w>") and t[: -len("</w>")].isascii()
         and t[: -len("</w>")].isalnum()}
    )
    chars = [chr(c) for c in range(33, 127)]
    pieces = [T5_PAD, T5_EOS, T5_UNK, "▁"]
    seen = set(pieces)
    for piece in [f"▁{w}" for w in words] + [f"▁{c}" for c in chars] + chars:
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    return tuple(pieces)


def t5_vocab_size() -> int:
    """Number of pieces of :func:`build_t5_tokenizer` (a text encoder's ``vocab_size`` must be >= it)."""
    return len(t5_pieces())


def build_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """A T5-style SentencePiece-Unigram tokenizer built offline (no hub, no sentencepiece file).

    Real T5 tokenizers (FLUX's ``tokenizer_2``, Kandinsky 3's ``tokenizer``) cannot be downloaded
    here, so this builds one of the same class, ``T5TokenizerFast``, with the same special tokens
    and ids (pad 0, eos 1, unk 2, an EOS appended and no BOS), a Metaspace pre-tokenizer and a
    Unigram model over whole lowercase-or-not English words. Every piece has the same score, so the
    segmentation with the fewest pieces wins: a word of the vocabulary is one token, like a real
    T5 tokenizer for common words. ``model_max_length`` is FLUX's 512 or Kandinsky 3's 128.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = t5_pieces()
    unigram = models.Unigram([(p, 0.0 if p in (T5_PAD, T5_EOS, T5_UNK) else -1.0) for p in pieces], unk_id=2)
    tok = Tokenizer(unigram)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD, extra_ids=0,
        model_max_length=model_max_length,
    )
