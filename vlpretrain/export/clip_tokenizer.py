"""open_clip's CLIP BPE tokenizer as transformers ``CLIPTokenizer`` files.

``SimpleTokenizer`` and ``CLIPTokenizer`` share the BPE vocabulary and merges; only the special
tokens are spelt differently (``<start_of_text>`` vs ``<|startoftext|>``, same ids). open_clip pads
with id 0, the token ``!``, so the files set ``pad_token="!"``; ``split_special_tokens=True`` keeps a
``!`` written in a caption an ordinary word piece (``!</w>``, id 256) instead of the pad token, as in
open_clip. Padded to the context length, both tokenizers then give identical ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from open_clip.tokenizer import SimpleTokenizer

_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def write_clip_tokenizer(directory: Path, context_length: int) -> Any:
    """Write vocab.json, merges.txt and the tokenizer configs into ``directory``; return the tokenizer.

    Example:
        >>> tok = write_clip_tokenizer(Path("out"), 77)
        >>> tok(["a cat"], padding="max_length", truncation=True).input_ids   # == SimpleTokenizer()(["a cat"])
    """
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer(context_length=context_length)
    vocab = {_SPECIAL.get(token, token): index for token, index in simple.encoder.items()}
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # The first line is a header both open_clip and transformers skip.
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                          encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), pad_token="!", model_max_length=context_length,
                                              split_special_tokens=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
