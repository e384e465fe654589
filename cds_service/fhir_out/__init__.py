"""Findings -> FHIR resources and CDS Hooks cards."""
