"""Image-text retrieval: embedding export, FAISS indexes, and the model signature they remember.

Example:
    >>> from vlpretrain.retrieval import RetrievalIndex, export_embeddings
    >>> emb = export_embeddings(model, open_corpus("pairs.csv"), "emb/pairs", spec="runs/demo-emoji/final")
    >>> index = RetrievalIndex.build(emb, "indexes/pairs")
    >>> index.search(texts=["a red heart"], k=5)[0][0]["image"]
"""

from .embedding_set import EmbeddingSet
from .embeddings import export_embeddings
from .index import RetrievalIndex
from .joint_index import JointIndex, open_index
from .signature import PROBE_TEXTS, check_same_model, model_signature

__all__ = ["RetrievalIndex", "JointIndex", "open_index", "EmbeddingSet", "export_embeddings", "model_signature",
           "check_same_model", "PROBE_TEXTS"]
