"""Layer 4: QC pages and evaluation against references."""
