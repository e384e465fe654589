"""CDS Hooks 2.0 service that flags AI findings on a patient's recent chest radiographs."""

__version__ = "0.1.0"
