"""optsel subpackage."""
