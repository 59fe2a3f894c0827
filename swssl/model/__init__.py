"""The encoder: backbones as specs, the SWSSL patch encoder and its ImageNet weights, checkpoints."""
