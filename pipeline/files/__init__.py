"""File helpers shared by every room of pipeline/: JSON with limits and named errors, new sibling folders."""
