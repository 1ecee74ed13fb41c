"""Control texts of the bias probes: text a model has no meaning for, and the control p-value.

A model that encodes the group attribute separates the groups along almost any text direction, so a
probe also asks whether the sensitive text singles a group out more than meaningless text would. The
control texts are pronounceable pseudo-words ("a bakil", ``control_words: pseudo``) or real whole
words of the model's own tokenizer vocabulary ("a harvest", ``control_words: vocabulary``), drawn
``controls`` times; ``control_p_value = (1 + #draws >= observed) / (1 + draws)``, where each draw's
statistic is the largest any group reaches (family-wise over the groups).

Example:
    >>> pseudo_words(2)
    ['a ...', 'a ...']
    >>> control_p_value(1.0, np.array([0.5, np.nan, 2.0]))
    0.666...
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["CONTROL_WORDS", "DEFAULT_CONTROLS", "MIN_VOCABULARY_WORD", "pseudo_words", "vocabulary_words",
           "ControlTexts", "control_p_value", "attach_control_p"]

DEFAULT_CONTROLS = 300
CONTROL_WORDS = ("pseudo", "vocabulary")
# Vocabulary control words: whole words of at least this many ASCII letters (shorter entries are mostly
# fragments and abbreviations).
MIN_VOCABULARY_WORD = 5


def pseudo_words(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct pronounceable pseudo-words with an article ("a bakil", "a tovemur"), seeded.

    They stand for text a model has no meaning for: the control texts of the bias probes.

    Example:
        >>> pseudo_words(2)
        ['a ...', 'a ...']
    """
    rng = np.random.default_rng(seed)
    consonants, vowels = list("bdfgklmnprstvz"), list("aeiou")
    words: dict[str, None] = {}
    while len(words) < count:
        syllables = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(int(rng.integers(2, 4))))
        words["a " + syllables + rng.choice(consonants)] = None
    return list(words)


def _whole_words(tokenizer: Any) -> Optional[list[str]]:
    """The whole-word entries of a tokenizer's vocabulary: open_clip's BPE words end in ``</w>``;
    Hugging Face vocabularies mark word starts with "Ġ" (byte BPE) or "▁" (SentencePiece), or, for
    WordPiece, mark continuations with "##". ``None`` when the tokenizer exposes no vocabulary."""
    encoder = getattr(tokenizer, "encoder", None)
    if isinstance(encoder, dict):  # open_clip's SimpleTokenizer
        return [w[:-4] for w in encoder if w.endswith("</w>")]
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # open_clip's HFTokenizer wraps a transformers one
    get_vocab = getattr(inner, "get_vocab", None)
    if get_vocab is None:
        return None
    vocab = list(get_vocab())
    for marker in ("\u0120", "\u2581"):
        if sum(w.startswith(marker) for w in vocab) > len(vocab) // 10:
            return [w[1:] for w in vocab if w.startswith(marker)]
    return [w for w in vocab if not w.startswith("##")]


def vocabulary_words(tokenizer: Any, count: int, seed: int = 0, exclude: Sequence[str] = ()) -> list[str]:
    """``count`` distinct real words with an article ("a harvest", "an orbit"), drawn (seeded) from the
    whole-word entries of ``tokenizer``'s vocabulary: lowercase ASCII letters only, at least
    ``MIN_VOCABULARY_WORD`` long, none of the words in the ``exclude`` texts. Control texts of the bias
    probes (``control_words: vocabulary``).

    Example:
        >>> vocabulary_words(open_clip.get_tokenizer("ViT-B-32"), 2, exclude=["a criminal"])
        ['a ...', 'a ...']
    """
    words = _whole_words(tokenizer)
    if words is None:
        raise ValueError(f"control_words: vocabulary needs a tokenizer with a vocabulary; "
                         f"{type(tokenizer).__name__} exposes none (use control_words: pseudo)")
    excluded = {w.lower() for text in exclude for w in text.split()}
    pool = sorted({w for w in words if len(w) >= MIN_VOCABULARY_WORD and w.isascii() and w.isalpha()
                   and w.islower() and w not in excluded})
    if len(pool) < count:
        raise ValueError(f"control_words: vocabulary: the tokenizer has {len(pool)} usable whole words, "
                         f"{count} are needed (lower 'controls' or use control_words: pseudo)")
    chosen = np.random.default_rng(seed).choice(len(pool), size=count, replace=False)
    return [("an " if pool[i][0] in "aeiou" else "a ") + pool[i] for i in sorted(chosen)]


def _probe_texts(probe: dict) -> list[str]:
    """Every text of a checked probe (the words vocabulary control words must not be)."""
    texts = [t for test in probe.get("association") or [] for t in test["sensitive"] + test["neutral"]]
    labels = probe.get("harmful_labels") or {}
    texts += list(labels.get("neutral", [])) + list(labels.get("sensitive", []))
    texts += [q for queries in ((probe.get("retrieval_skew") or {}).get("queries") or {}).values() for q in queries]
    return texts


class ControlTexts:
    """The control-word pool of one probe run, embedded, and seeded draws from it.

    Each draw takes as many control words as the texts it replaces, without replacement, from a pool
    large enough (10x the largest draw, and ``controls + 50``) that draws overlap little. One random
    generator serves the whole run, so the draws depend on the order the sections run in.

    Example:
        >>> control = ControlTexts(probe, texts.mean, model.tokenizer, controls=300, kind="pseudo", seed=0)
        >>> control.draw(2).shape
        torch.Size([2, 512])
    """

    def __init__(self, probe: dict, embed: Callable[[list[str]], torch.Tensor], tokenizer: Any, controls: int,
                 kind: str, seed: int):
        largest = max([len(t["sensitive"]) for t in probe.get("association") or []]
                      + [len((probe.get("harmful_labels") or {}).get("sensitive", []))]
                      + [len(q) for q in ((probe.get("retrieval_skew") or {}).get("queries") or {}).values()] + [1])
        pool_size = max(controls + 50, 10 * largest)
        words = (pseudo_words(pool_size, seed) if kind == "pseudo" else
                 vocabulary_words(tokenizer, pool_size, seed, exclude=_probe_texts(probe)))
        self.embeddings = embed(words).double()  # (pool, D)
        self.rng = np.random.default_rng(seed)

    def draw(self, count: int) -> torch.Tensor:
        """``count`` distinct control embeddings, (count, D) float64."""
        return self.embeddings[self.rng.choice(len(self.embeddings), count, replace=False)]


def control_p_value(observed: float, null_max: np.ndarray) -> float:
    """``(1 + #draws >= observed) / (1 + draws)`` over the draws' largest group statistic ``null_max``;
    NaN draws (no spread, so no effect size) are left out.

    Example:
        >>> control_p_value(1.0, np.array([0.5, np.nan, 2.0]))
        0.666...
    """
    null_max = np.asarray(null_max, dtype=np.float64)
    null_max = null_max[~np.isnan(null_max)]
    if np.isnan(observed):
        return float("nan")
    return float((1 + np.sum(null_max >= observed - 1e-12)) / (1 + len(null_max)))


def attach_control_p(per_group: dict, names: Sequence[str], key: str, null_max: np.ndarray) -> None:
    """Set each group's ``control_p_value`` from its statistic ``per_group[name][key]``."""
    for name in names:
        per_group[name]["control_p_value"] = control_p_value(per_group[name][key], null_max)
