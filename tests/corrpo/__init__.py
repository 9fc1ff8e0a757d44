"""Tests of entropy_gpu/corrpo/: the CorR-PO reward and corrpo_from_model."""
