"""Layer 2: reading archives into cases and volumes (files, DICOM, archives, DICOMweb, object stores)."""
