"""tierserve router: embeddings, exemplars and scoring that pick a tier before the call."""
