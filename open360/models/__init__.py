"""Decoder model zoo (Amber/LLaMA, CrystalCoder with muP, phi-1.5), FLOP counts and HF interop."""
