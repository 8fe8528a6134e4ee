"""Layer 6: the Ray pool of annotator actors."""
