"""Authentication of CDS clients."""
