"""Flask web layer of the EHR sandbox."""
