"""Layer 7: rounds, review, calibration, fine-tuning and detector training."""
