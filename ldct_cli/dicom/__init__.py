"""Reading CT series to HU and writing derived (denoised) series, with pydicom."""
