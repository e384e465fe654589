"""FHIR R4 resource storage and search for the EHR sandbox (no web framework imports)."""
