"""GSPS presentation states and TID 1500 measurement reports written with highdicom, as a reading station
stores a radiologist's marks. Points are given as x/y pixel indices (pixel centres) and written in graphic
coordinates (the top-left corner of the image at 0, 0: index + 0.5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LONG_AXIS = ("103339001", "SCT", "Long axis")
SHORT_AXIS = ("103340004", "SCT", "Short axis")
LESION = ("52988006", "SCT", "Lesion")


def _uid() -> str:
    import highdicom as hd

    return hd.UID()


def graphic(points_xy) -> np.ndarray:
    return np.asarray(points_xy, dtype=float) + 0.5


def images_by_slice(folder: Path, volume) -> dict:
    """A series' datasets (pydicom) keyed by the Volume's slice index (through their positions)."""
    import pydicom

    inverse = np.linalg.inv(volume.geometry.affine)
    out = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(str(path))
        ras = np.asarray([float(v) for v in ds.ImagePositionPatient]) * [-1, -1, 1]
        out[int(round((inverse @ [*ras, 1])[0]))] = ds
    return out


def image_xy(ds, volume, z: int, xy: np.ndarray) -> np.ndarray:
    """Volume voxel x/y indices on slice z -> the image's (a pydicom dataset's) own column/row indices (pixel
    centres)."""
    affine = volume.geometry.affine
    zyx = np.column_stack([np.full(len(xy), z), xy[:, 1], xy[:, 0], np.ones(len(xy))])
    lps = (affine @ zyx.T).T[:, :3] * [-1, -1, 1]
    origin = np.asarray([float(v) for v in ds.ImagePositionPatient])
    orient = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    rows, cols = (float(v) for v in ds.PixelSpacing)
    return np.column_stack([(lps - origin) @ orient[:3] / cols, (lps - origin) @ orient[3:] / rows])


def write_gsps(path: Path, images: list, annotations: list[dict]) -> Path:
    """A grayscale softcopy presentation state over ``images`` (pydicom datasets). Each annotation:
    ``image`` (dataset), ``layer`` (name), ``objects``: [(graphic type, (N, 2) x/y indices, tracking uid or
    None)], optional ``arrows``: [(x, y)] text anchor points."""
    import highdicom as hd

    layers = {a["layer"]: hd.pr.GraphicLayer(a["layer"], order=i + 1) for i, a in enumerate(annotations)}
    items = []
    for a in annotations:
        objects = [
            hd.pr.GraphicObject(
                kind, graphic(points), "PIXEL", tracking_id="t" if uid else None, tracking_uid=uid
            )
            for kind, points, uid in a.get("objects", [])
        ]
        texts = [
            hd.pr.TextObject(
                "arrow", "PIXEL", anchor_point=tuple(float(v) + 0.5 for v in xy), bounding_box=None
            )
            for xy in a.get("arrows", [])
        ]
        items.append(
            hd.pr.GraphicAnnotation(
                [a["image"]], layers[a["layer"]], graphic_objects=objects or None, text_objects=texts or None
            )
        )
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=images,
        series_instance_uid=_uid(),
        series_number=90,
        sop_instance_uid=_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        content_label="MARKS",
        graphic_annotations=items,
        graphic_layers=list(layers.values()),
    )
    state.save_as(str(path))
    return path


def _code(triple):
    from pydicom.sr.coding import Code

    return Code(*triple)


def write_sr(path: Path, images: list, findings: list[dict]) -> Path:
    """A Comprehensive 3D SR with a TID 1500 measurement report. Each finding: ``image`` (dataset), ``long``
    and optionally ``short`` ((2, 2) x/y indices; a TID 1501 group of Long/Short axis measurements with their
    coordinates), optional ``finding`` (code triple), optional ``region`` ((N, 2) closed outline) or
    ``region3d`` ((N, 3) LPS mm points with ``frame_of_reference``) as a TID 1410 group with the same tracking
    identifier."""
    import highdicom as hd

    groups = []
    for n, f in enumerate(findings, start=1):
        source = _source(f)
        measurements = []
        for triple, key in ((LONG_AXIS, "long"), (SHORT_AXIS, "short")):
            if f.get(key) is not None:
                coords = hd.sr.CoordinatesForMeasurement("POLYLINE", graphic(f[key]), source)
                length = float(np.linalg.norm(np.subtract(*np.asarray(f[key], dtype=float))))
                measurements.append(
                    hd.sr.Measurement(
                        _code(triple),
                        length,
                        _code(("mm", "UCUM", "millimeter")),
                        referenced_coordinates=[coords],
                    )
                )
        uid, finding = _uid(), _code(f.get("finding", LESION))
        if measurements:  # TID 1501: the axes as measurements with their image coordinates
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=f"finding {n}"),
                    finding_type=finding,
                    measurements=measurements,
                )
            )
        region = None
        if "region3d" in f:
            region = hd.sr.ImageRegion3D(
                "POLYGON", np.asarray(f["region3d"], dtype=float), f["frame_of_reference"]
            )
        elif "region" in f:
            region = hd.sr.ImageRegion(
                "POLYLINE", graphic(f["region"]), hd.sr.SourceImageForRegion(**source_kwargs(f))
            )
        if region is not None:  # TID 1410: the finding's outline, same tracking identifier
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=f"finding {n}"),
                    referenced_region=region,
                    finding_type=finding,
                )
            )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(),
        procedure_reported=_code(("363679005", "SCT", "Imaging procedure")),
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=images,
        content=report,
        series_instance_uid=_uid(),
        series_number=91,
        sop_instance_uid=_uid(),
        instance_number=1,
        manufacturer="test",
    )
    sr.save_as(str(path))
    return path


def source_kwargs(f: dict) -> dict:
    image = f["image"]
    return {
        "referenced_sop_class_uid": image.SOPClassUID,
        "referenced_sop_instance_uid": image.SOPInstanceUID,
    }


def _source(f: dict):
    import highdicom as hd

    return hd.sr.SourceImageForMeasurement(**source_kwargs(f))
