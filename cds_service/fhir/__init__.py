"""FHIR R4 access: REST client, prefetch resolution, ImagingStudy helpers."""
