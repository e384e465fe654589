"""A local EHR for demos and tests: FHIR R4 server, CDS Hooks client, seed data."""
