"""Training the encoder on normal windows: the triplet dataset, the SWSSL loss, the loop."""
