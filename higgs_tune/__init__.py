"""higgs_tune: torchtune-style fine-tuning for Boson AI's Higgs Audio v2."""

__version__ = "0.1.0"
