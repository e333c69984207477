"""cim-pipeline: turn a NixOS domain into tested, installable machine images (see dodo.py and README.md)."""
