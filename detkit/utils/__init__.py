"""Small helpers shared across detkit."""
