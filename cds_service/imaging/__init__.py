"""From an ImagingStudy to the 8-bit frontal chest image the model sees: fetch, select, decode."""
