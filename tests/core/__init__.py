"""Tests of the core API, the top-level modules of entropy_gpu/: token_stats, autograd, the torch
op, validation, row blocks, the fused LM head, vocabulary-parallel statistics."""
