"""dermnode: a DICOM-integrated dermoscopy analysis node (decision support only)."""

__version__ = "0.1.0"
