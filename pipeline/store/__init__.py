"""Layer 2: the case store (OME-Zarr groups committed last) and its JSON records."""
