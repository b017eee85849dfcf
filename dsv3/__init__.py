"""dsv3: a training system for the DeepSeek-V3 architecture and the R1 post-training recipe."""
