"""Layer 9: the medsam-engine command line (the only layer that imports flows/)."""
