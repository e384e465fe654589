"""SMART on FHIR app: the clinician's viewer for AI chest radiograph results."""
