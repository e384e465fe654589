"""SMART on FHIR authorization for the EHR sandbox."""
