"""Experiments built on the integrations: CorR-PO in training (corrpo_training)."""
