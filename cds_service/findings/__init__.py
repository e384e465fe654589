"""Report text -> coded findings: the 14 CheXpert observations with negation and uncertainty."""
