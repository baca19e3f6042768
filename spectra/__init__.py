"""spectra package."""
