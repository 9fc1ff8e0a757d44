"""Tests of entropy_gpu/integrations/verl/: the drop-ins, patching, CorR-PO, the plugin, the recipe."""
