"""Curator outputs built from records + image embeddings: tag suggestions with evidence, controlled-vocabulary
classification, and latent walks between two works. Plain functions (numpy / pyarrow / FAISS); the report stage
renders them with ``artsim.report.html``. See docs/curate.md."""
from artsim.curate.tags import evaluate_tag_recommendation, evaluate_tag_signals, recommend_tags
from artsim.curate.vocabulary import (Concept, classify_vocabulary, evaluate_vocabulary, known_concepts,
                                      load_vocabulary)
from artsim.curate.walks import latent_walk, slerp

__all__ = ["recommend_tags", "evaluate_tag_recommendation", "evaluate_tag_signals", "classify_vocabulary", "evaluate_vocabulary",
           "known_concepts", "load_vocabulary", "Concept", "latent_walk", "slerp"]
