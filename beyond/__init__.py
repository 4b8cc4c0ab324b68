"""Ideas beyond the assignment, one small module each, each with its own page under docs/."""
