"""pemae: Pseudo Labelling for Enhanced Masked Autoencoders (Nandam et al., BMVC 2024)."""

__version__ = "0.1.0"
