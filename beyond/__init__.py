"""Ideas beyond the assignment: one small module each, checked against the readable path."""
