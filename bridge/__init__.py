"""orthanc-bridge: make compressed DICOM readable by uncompressed-only software."""

__version__ = "0.1.0"
