"""Test-time compute: spend inference instead of training (best-of-N reranking, critique-guided refinement)."""
