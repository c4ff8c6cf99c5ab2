"""Word-level tokenizers built offline from the words of a built-in world.

The world's language is small and closed, so a word-level vocabulary covers it exactly: every
word the model ever reads or writes gets its own id, and no subword merges blur the answers the
editors are scored on. Text is lower-cased and split on whitespace and punctuation (the
`tokenizers` ``Whitespace`` pre-tokenizer, ``\\w+|[^\\w\\s]+``); the vocabulary is built with the
same pre-tokenizer, so no world word maps to ``<unk>``.

Two builders differ only in how ``<image>`` is declared, because the processors need it so:
``LlavaProcessor`` reads ``tokenizer.image_token``; ``Blip2Processor`` crashes when that attribute
exists (it expects to add ``<image>`` itself).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
# Fixed ids 0..4, whatever the world: configs and tests rely on them.
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
ARCHES = ("llava", "blip2")

# Words the protocol prompts add around the world's own text (data/prompts.py).
PROTOCOL_TEXT = ("The answer is:", "?", "nq question:", "\n")

# Text fields of edit records (MMEdit's 11 fields plus the hard-locality ones) that hold words.
RECORD_TEXT_FIELDS = (
    "src", "pred", "rephrase", "alt", "loc", "loc_ans", "m_loc_q", "m_loc_a",
    "hard_m_loc_q", "hard_m_loc_a",
)
RECORD_FILES = (
    "vqa/vqa_train.json", "vqa/vqa_eval.json",
    "caption/caption_train_edit.json", "caption/caption_eval_edit.json",
)
CORPUS_FILES = ("corpus/train.jsonl", "corpus/heldout.jsonl")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Whitespace()


def split_words(text: str) -> list[str]:
    """Split text the way the tokenizer does: lower-case, whitespace and punctuation.

    Example:
        >>> split_words("nq question: Where is Velmar?")
        ['nq', 'question', ':', 'where', 'is', 'velmar', '?']
    """
    pieces = _pre_tokenizer().pre_tokenize_str(text.lower())
    return [piece for piece, _span in pieces]


def words_from_texts(texts: Iterable[str]) -> list[str]:
    """Sorted set of the words in `texts` (special tokens excluded)."""
    words: set[str] = set()
    for text in texts:
        words.update(split_words(text))
    return sorted(words.difference(SPECIAL_TOKENS))


def _world_texts(world_dir: Path) -> Iterable[str]:
    """Every piece of text in a world folder: corpus lines and edit records."""
    yield from PROTOCOL_TEXT
    for name in CORPUS_FILES:
        path = world_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: world corpus file missing (build the world first)")
        with path.open(encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                for field in ("question", "answer"):
                    if not isinstance(row.get(field), str):
                        raise ValueError(f"{path}:{line_no}: field {field!r} must be a string")
                    yield row[field]
    for name in RECORD_FILES:
        path = world_dir / name
        if not path.is_file():
            logger.warning("%s: record file missing, its words are not in the vocabulary", path)
            continue
        records = json.loads(path.read_text(encoding="utf-8"))
        for index, record in enumerate(records):
            for field in RECORD_TEXT_FIELDS:
                value = record.get(field)
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise ValueError(f"{path}: record {index}: field {field!r} must be a string")
                yield value


def world_words(world_dir: str | Path) -> list[str]:
    """All words of a world folder, sorted: corpus, the four record files, protocol words.

    Uses the world package's `world_vocabulary` as well when it is available, so words that
    world.json knows but no file states yet are covered too.
    """
    world_dir = Path(world_dir)
    words = set(words_from_texts(_world_texts(world_dir)))
    try:
        from dualedit.world import load_world, world_vocabulary
    except ImportError:
        logger.debug("dualedit.world not importable; vocabulary from files only")
    else:
        words.update(w for word in world_vocabulary(load_world(world_dir)) for w in split_words(word))
    return sorted(words.difference(SPECIAL_TOKENS))


def build_tokenizer(words: Iterable[str], arch: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` for one architecture ("llava" or "blip2").

    Ids 0..4 are ``<pad> <s> </s> <unk> <image>``; words follow in sorted order. Encoding
    prepends ``<s>``; ``</s>`` is never added automatically (training text ends with it
    explicitly so that `generate()` learns to stop). Decoding puts one space between tokens,
    punctuation included ("nq question : ...").

    Example:
        >>> tok = build_tokenizer(["red", "circle", "?"], "llava")
        >>> tok("<image>\\nRed circle?").input_ids
        [1, 4, 7, 6, 5]
    """
    if arch not in ARCHES:
        raise ValueError(f"arch {arch!r}: expected one of {ARCHES}")
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words)):
        for piece in split_words(word):
            if piece not in vocab:
                vocab[piece] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = _pre_tokenizer()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    extra = {"extra_special_tokens": {"image_token": IMAGE}} if arch == "llava" else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        padding_side="right", **extra,
    )


def build_world_tokenizer(world_dir: str | Path, arch: str) -> PreTrainedTokenizerFast:
    """`build_tokenizer` over every word of the world folder `world_dir`."""
    return build_tokenizer(world_words(world_dir), arch)
