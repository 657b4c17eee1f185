"""Reading CRIU image files."""
