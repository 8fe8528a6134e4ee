"""DICOM SEG made from a source series with highdicom, as a reviewer's station or another tool writes it."""

from __future__ import annotations

import numpy as np
import pydicom

from medsam_engine.pipeline.io.readers import read_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _per_file(labels_zyx: np.ndarray, volume, datasets) -> np.ndarray:
    """``labels_zyx`` (on ``volume``'s grid) sampled at every pixel of each source file: (frames, rows,
    cols)."""
    to_voxel = np.linalg.inv(volume.geometry.affine)
    frames = []
    for ds in datasets:
        rows, cols = int(ds.Rows), int(ds.Columns)
        row_dir, col_dir = (
            np.array(ds.ImageOrientationPatient[:3], float),
            np.array(ds.ImageOrientationPatient[3:], float),
        )
        spacing_r, spacing_c = map(float, ds.PixelSpacing)
        r, c = np.mgrid[0:rows, 0:cols]
        lps = (
            np.array(ds.ImagePositionPatient, float)[None, None]
            + c[..., None] * row_dir * spacing_c
            + r[..., None] * col_dir * spacing_r
        )
        ras = np.concatenate([lps, np.ones((rows, cols, 1))], axis=-1) @ LPS_TO_RAS.T
        zyx = np.rint(ras @ to_voxel.T)[..., :3].astype(int)
        frames.append(labels_zyx[zyx[..., 0], zyx[..., 1], zyx[..., 2]])
    return np.stack(frames)


def reviewer_seg(series_folder, labels_zyx, names: dict[int, str], path) -> None:
    """A DICOM SEG of ``labels_zyx`` (on the series' grid) made from the source series with highdicom, as a
    reviewer's station or another tool writes it (not by this engine)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    files = sorted(series_folder.iterdir())
    datasets = [pydicom.dcmread(str(f)) for f in files]
    volume = read_volume(series_folder)
    frames = _per_file(labels_zyx, volume, datasets)
    numbers = sorted(names)
    pixel = np.stack([frames == value for value in numbers], axis=-1).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k,
            segment_label=names[value],
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=codes.SCT.Lung,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for k, value in enumerate(numbers, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="another tool",
        manufacturer_model_name="reviewer station",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(str(path))
