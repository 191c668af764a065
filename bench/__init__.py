"""Throughput benchmarks: Atelier's training loop against loops written to the diffusers-example recipes."""
