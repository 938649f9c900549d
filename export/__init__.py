"""Export a MiniCPM-V Hugging Face checkpoint (reader, synthetic checkpoints, torch reference, writers)."""
