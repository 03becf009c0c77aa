"""Reference-particle quality control: bead phase fits, QC runs, QC records and the scale
they give the live acquisition (see :mod:`.sphere`, :mod:`.measure`, :mod:`.record`)."""
