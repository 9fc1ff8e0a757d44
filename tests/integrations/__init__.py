"""Tests of entropy_gpu/integrations/: the trainer integrations (TRL, verl)."""
