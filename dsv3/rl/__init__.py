"""R1 post-training pieces: the prompt template, verifiable task families, rule rewards, cold-start SFT data."""
